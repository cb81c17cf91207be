"""Which policy serves each name right now, swapped atomically and never backwards.

The request path reads ``host.current(name)`` once per request and uses that immutable
``ActivePolicy`` to the end, so a swap that lands mid-batch never mixes two versions in one
slate. ``swap`` installs a fully built policy (its faiss index included) with one reference
assignment under a lock and refuses a version that is not newer than the one serving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from recloop.core.ports import SlatePolicy
from recloop.serving.retrieval import CatalogueIndex


class StaleVersionError(ValueError):
    """A swap to a version older than or equal to the one serving was refused."""


@dataclass(frozen=True)
class ActivePolicy:
    """A loaded snapshot ready to serve: immutable, so readers need no lock."""

    name: str
    version: int
    algorithm: str
    policy: SlatePolicy
    index: CatalogueIndex | None = None
    loaded_ts: float = 0.0


class PolicyHost:
    """The current ``ActivePolicy`` per policy name (``None`` until its first snapshot)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._active: dict[str, ActivePolicy | None] = dict.fromkeys(names)
        self._lock = threading.Lock()
        self.swaps = 0
        self.refused_stale = 0

    @property
    def names(self) -> list[str]:
        return list(self._active)

    def hosts(self, name: str) -> bool:
        return name in self._active

    def current(self, name: str) -> ActivePolicy | None:
        return self._active[name]

    def version(self, name: str) -> int | None:
        active = self._active[name]
        return None if active is None else active.version

    def swap(
        self,
        name: str,
        version: int,
        policy: SlatePolicy,
        *,
        algorithm: str = "",
        index: CatalogueIndex | None = None,
    ) -> ActivePolicy:
        """Serve ``policy`` as ``version`` of ``name`` from now on.

        Raises ``KeyError`` for a name this host does not serve and ``StaleVersionError``
        when ``version`` is not newer than the current one.
        """
        if name not in self._active:
            raise KeyError(f"this server does not serve policy {name!r}; it serves {self.names}")
        with self._lock:
            current = self._active[name]
            if current is not None and version <= current.version:
                self.refused_stale += 1
                raise StaleVersionError(
                    f"{name}: version {version} is not newer than the serving {current.version}"
                )
            active = ActivePolicy(name, version, algorithm, policy, index, time.time())
            self._active[name] = active
            self.swaps += 1
            return active
