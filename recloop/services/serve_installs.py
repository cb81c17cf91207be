"""Announced snapshots on their way into serving: the last good version wins, never random.

``announce`` keeps every announcement not yet tried, per policy and version (the newest
``KEEP`` versions of each policy; a repeated announcement of a version replaces the one
kept). ``install_pending`` takes a policy's kept announcements newest first: a refused one
(damaged files, hashes that do not match, a loader that fails) is counted and the next older
one is tried, until one swaps in or is stale (not above the version serving), so

- with v1 valid and v2 damaged announced before the first install, v1 serves, not the
  fallback;
- serving v1 when v2 is refused keeps v1.

An announcement the installer does not admit (``SnapshotInstaller.admit``: a bad signature,
a path outside the snapshot root or not the learner's name for it) is refused and counted at
once and never kept, so forged announcements cannot push real ones out of the kept window.
Which version counts as newest rises only with an announcement that was authenticated (its
signature verified under the snapshot key), swapped in or found stale: a refused one, such as
a forged huge version, never moves it, so real versions are never judged by it.

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
        admit = getattr(self.installer, "admit", None)
        refusal = admit(published) if admit is not None else None
        if refusal is not None:
            self._refused(published, refusal)
            return
        with self._cv:
            kept = self._pending.setdefault(published.policy, {})
            kept[published.version] = published
            while len(kept) > KEEP:
                del kept[min(kept)]
            if getattr(self.installer, "authenticates", False):
                self._raise_newest(published)
            self._cv.notify_all()

    def newest(self, policy: str) -> int:
        """The newest version of ``policy`` that counts (see the module docstring)."""
        with self._cv:
            return self._newest.get(policy, 0)

    def _raise_newest(self, published: PolicyPublished) -> None:
        self._newest[published.policy] = max(self._newest.get(published.policy, 0),
                                             published.version)  # fmt: skip

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
            metrics.SERVING_BEHIND_NEWEST.labels(name).set(max(0, self.newest(name) - serving))

    def _install(self, published: PolicyPublished) -> str:
        name = published.policy
        try:
            result = self.installer.install(published)
        except Exception as exc:  # the loop must outlive any one bad snapshot
            self.errors.append(f"install {name} v{published.version}: {exc!r}")
            metrics.SNAPSHOTS_REFUSED.labels("serve", name).inc()
            return "refused"
        if result.status == "refused":
            self._refused(published, result)
            return result.status
        self.results.append(result)
        if result.status in ("swapped", "stale"):
            with self._cv:
                self._raise_newest(published)
        if result.status == "swapped" and published.path:
            try:
                metrics.export_swap(published, self.installer.resolve(published.path))
            except Exception as exc:  # an in-process installer has no snapshot root
                log.debug("no snapshot metrics for %s v%d: %s", name, published.version, exc)
        return result.status

    def _refused(self, published: PolicyPublished, result: InstallResult) -> None:
        self.results.append(result)
        metrics.SNAPSHOTS_REFUSED.labels("serve", published.policy).inc()
        log.warning("refused snapshot %s v%d (trying an older one): %s", published.policy,
                    published.version, result.reason)  # fmt: skip
