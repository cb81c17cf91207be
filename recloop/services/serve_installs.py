"""Announced snapshots on their way into serving: newest pending per policy, then installed.

``announce`` keeps only the newest announcement per policy (an older one queued behind a
newer one would be refused as stale anyway). ``install_pending`` installs them in the
caller's thread (the in-process round); ``run_until`` is the Kafka process's installer
thread, which waits for announcements off the request path so a swap never stalls a request.
An installer failure is noted in ``errors`` and the loop goes on: it must outlive any one bad
snapshot.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from recloop import metrics
from recloop.core.events import PolicyPublished
from recloop.serving.snapshots import InstallResult

log = logging.getLogger(__name__)


class Installs:
    """The pending announcements of one server and the installer that takes them."""

    def __init__(self, installer: Any, results: deque[InstallResult], errors: deque[str]) -> None:
        self.installer, self.results, self.errors = installer, results, errors
        self._pending: dict[str, PolicyPublished] = {}
        self._cv = threading.Condition()

    def announce(self, published: PolicyPublished) -> None:
        with self._cv:
            queued = self._pending.get(published.policy)
            if queued is None or published.version > queued.version:
                self._pending[published.policy] = published
            self._cv.notify_all()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _next(self) -> PolicyPublished | None:
        with self._cv:
            return self._pending.pop(next(iter(self._pending))) if self._pending else None

    def install_pending(self) -> None:
        while (published := self._next()) is not None:
            self._install(published)

    def run_until(self, stop: threading.Event) -> None:
        while True:
            with self._cv:
                while not self._pending and not stop.is_set():
                    self._cv.wait(timeout=0.5)
                if stop.is_set():
                    return
            self.install_pending()

    def _install(self, published: PolicyPublished) -> None:
        name = published.policy
        try:
            result = self.installer.install(published)
        except Exception as exc:  # the loop must outlive any one bad snapshot
            self.errors.append(f"install {name} v{published.version}: {exc!r}")
            return
        self.results.append(result)
        if result.status == "swapped" and published.path:
            metrics.export_swap(published, self.installer.resolve(published.path))
        if result.status == "refused":
            log.warning("refused snapshot %s v%d: %s", name, published.version, result.reason)
