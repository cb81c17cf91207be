"""Whether the broker is there: the streams worker's outage watch.

faust and aiokafka wait a broker outage out themselves (they retry until it answers); the
worker only needs to *know* about it, so that the expiry sweep stands still and the wait is
reported: "waiting for the broker" in the log and ``recloop_waiting_for_broker`` at 1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from recloop import metrics

log = logging.getLogger(__name__)

PROCESS = "streams"

PROBE_INTERVAL_S = 2.0
"""How often ``BrokerWatch`` tries the broker."""
PROBE_TIMEOUT_S = 1.5
"""Longest wait for the broker's port to accept a connection."""
REPORT_EVERY_S = 10.0
"""How often a wait for the broker is logged again."""


class BrokerWatch:
    """Whether the broker is there, by a TCP connect to each bootstrap server every
    ``PROBE_INTERVAL_S``: it is away while none accepts.

    While it is away the log says "waiting for the broker" (every ``REPORT_EVERY_S``) and
    ``recloop_waiting_for_broker{process="streams"}`` is 1; when it is back, 0, a last log
    line, and ``on_back(wall clock now)``. faust and aiokafka do the waiting themselves (they
    retry until the broker answers); this only tells, so that the expiry sweep stands still.
    """

    def __init__(self, bootstrap: str, on_back: Callable[[float], None]) -> None:
        self.servers = [_host_port(server) for server in bootstrap.split(",")]
        self.on_back = on_back
        self.away_since: float | None = None
        self._reported_at = 0.0

    @property
    def away(self) -> bool:
        return self.away_since is not None

    async def probe(self) -> None:
        error = await _unreachable(self.servers, PROBE_TIMEOUT_S)
        now = time.monotonic()
        if error is None:
            if self.away_since is not None:
                log.warning("streams: the broker is back after %.0f s", now - self.away_since)
                self.away_since = None
                metrics.WAITING_FOR_BROKER.labels(PROCESS).set(0)
                self.on_back(time.time())
            return
        if self.away_since is None:
            self.away_since = self._reported_at = now
            metrics.WAITING_FOR_BROKER.labels(PROCESS).set(1)
            log.warning("streams: waiting for the broker (%s)", error)
        elif now - self._reported_at >= REPORT_EVERY_S:
            self._reported_at = now
            log.warning(
                "streams: waiting for the broker for %.0f s (%s)", now - self.away_since, error
            )


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.strip().rpartition(":")
    return host.strip("[]"), int(port)


async def _unreachable(servers: list[tuple[str, int]], timeout: float) -> str | None:
    """None if one of ``servers`` accepts a TCP connection within ``timeout``, else why not."""
    error = "no bootstrap server"
    for host, port in servers:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            error = f"{host}:{port}: {exc or type(exc).__name__}"
            continue
        writer.close()
        return None
    return error
