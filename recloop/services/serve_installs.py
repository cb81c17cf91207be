"""Announced snapshots on their way into serving: the last good version wins, never random.

``announce`` keeps every announcement not yet tried, per policy and version (the newest
``KEEP`` versions of each policy; a repeated announcement of a version replaces the one
kept). ``install_pending`` takes a policy's kept announcements newest first: a refused one
(damaged files, hashes that do not match, a loader that fails) is counted and the next older
one is tried, until one swaps in or is stale (not above the version serving), so

- with v1 valid and v2 damaged announced before the first install, v1 serves, not the
  fallback;
- serving v1 when v2 is refused keeps v1.

``install_pending`` installs in the caller's thread (the in-process round); ``run_until`` is
the Kafka process's installer thread, which waits for announcements off the request path so
a swap never stalls a request. An installer failure is noted in ``errors`` and the loop goes
on: it must outlive any one bad snapshot. Metrics: ``recloop_snapshots_refused_total
{process="serve"}`` per policy, and ``recloop_serving_behind_newest{policy}``, the newest
announced version minus the one serving.
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

KEEP = 16
"""Untried announcements kept per policy (the newest versions)."""


class Installs:
    """The pending announcements of one server and the installer that takes them."""

    def __init__(self, installer: Any, results: deque[InstallResult], errors: deque[str]) -> None:
        self.installer, self.results, self.errors = installer, results, errors
        self._pending: dict[str, dict[int, PolicyPublished]] = {}
        self._newest: dict[str, int] = {}
        self._cv = threading.Condition()

    def announce(self, published: PolicyPublished) -> None:
        with self._cv:
            kept = self._pending.setdefault(published.policy, {})
            kept[published.version] = published
            while len(kept) > KEEP:
                del kept[min(kept)]
            self._newest[published.policy] = max(self._newest.get(published.policy, 0),
                                                 published.version)  # fmt: skip
            self._cv.notify_all()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _next(self) -> list[PolicyPublished] | None:
        """One policy's kept announcements, newest first (taken out of the pending set)."""
        with self._cv:
            if not self._pending:
                return None
            kept = self._pending.pop(next(iter(self._pending)))
            return [kept[version] for version in sorted(kept, reverse=True)]

    def install_pending(self) -> None:
        while (candidates := self._next()) is not None:
            self._install_newest_good(candidates)

    def run_until(self, stop: threading.Event) -> None:
        while True:
            with self._cv:
                while not self._pending and not stop.is_set():
                    self._cv.wait(timeout=0.5)
                if stop.is_set():
                    return
            self.install_pending()

    def _install_newest_good(self, candidates: list[PolicyPublished]) -> None:
        # Once one swaps in or is stale, every older one would be stale too.
        for published in candidates:
            if self._install(published) in ("swapped", "stale", "ignored"):
                break
        name = candidates[0].policy
        if self.installer.host.hosts(name):
            serving = self.installer.host.version(name) or 0
            metrics.SERVING_BEHIND_NEWEST.labels(name).set(self._newest[name] - serving)

    def _install(self, published: PolicyPublished) -> str:
        name = published.policy
        try:
            result = self.installer.install(published)
        except Exception as exc:  # the loop must outlive any one bad snapshot
            self.errors.append(f"install {name} v{published.version}: {exc!r}")
            metrics.SNAPSHOTS_REFUSED.labels("serve", name).inc()
            return "refused"
        self.results.append(result)
        if result.status == "swapped" and published.path:
            metrics.export_swap(published, self.installer.resolve(published.path))
        if result.status == "refused":
            metrics.SNAPSHOTS_REFUSED.labels("serve", name).inc()
            log.warning("refused snapshot %s v%d (trying an older one): %s", name,
                        published.version, result.reason)  # fmt: skip
        return result.status
