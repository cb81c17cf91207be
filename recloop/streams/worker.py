"""Run one streams worker in this process: what ``recloop streams`` ends in.

``recloop streams`` (``recloop.cli.streams``) is the worker's only command line: it reads the
settings from the environment (``RECLOOP_*``, see ``recloop.core.settings``), creates the
topics, starts the metrics endpoint and calls ``run``. Start more workers with the same
``--app-id`` to split the partitions. SIGTERM or Ctrl-C stops the worker cleanly; after a
kill -9 a restarted worker recovers its table from the changelog.
"""

from __future__ import annotations

from typing import Any

import faust

from recloop.core.settings import Settings
from recloop.streams.app import BatchObserver, StreamsConfig, create_app, tune_gc


class _Worker(faust.Worker):
    def on_setup_root_logger(self, logger: Any, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        # mode leaves the root logger at DEBUG (its handler filters), so every library's
        # debug call still builds a record: measurable per message at 10k messages/s.
        logger.setLevel(self.loglevel)


def run(
    settings: Settings,
    config: StreamsConfig,
    loglevel: str = "WARNING",
    observer: BatchObserver | None = None,
) -> None:
    """Build the app and run a faust worker until it is told to stop."""
    streams = create_app(settings, config, observer=observer)
    tune_gc()
    worker = _Worker(streams.app, loglevel=loglevel.upper(), quiet=True)
    worker.execute_from_commandline()
