"""The catalogue serving answers from: an ``ItemCatalogue`` and the index of its features.

Serving never builds the simulator to learn its items: the service follows the ``items`` and
``catalogue`` topics (``recloop.kafka.catalogue.CatalogueFollower``) and hands every new
version to ``CatalogueSwap.offer``. The swap builds that version's faiss index over the
catalogue's features (``CatalogueIndex``, chosen by size, its recall measured) off the
request path, then installs the pair as one immutable ``ServedCatalogue`` with a single
reference assignment. A request batch takes ``current`` once, so it never sees a catalogue
of one version with the index of another, and a build never blocks or drops a request.

Rules:

- only the newest offered version waits to be built; an older or equal offer than the one
  serving (or waiting) is dropped;
- a catalogue without features (``F == 0``, items known by id) gets no index: retrieval
  then uses a snapshot's learned item embeddings, or the policy ranks the whole catalogue;
- a build that fails (faiss out of memory, ...) keeps the current catalogue serving and is
  noted in ``errors``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from recloop.core.catalogue import ItemCatalogue
from recloop.serving.retrieval import CatalogueIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedCatalogue:
    """One catalogue version and the index of its features (``None`` when it has none)."""

    catalogue: ItemCatalogue
    index: CatalogueIndex | None = None

    @property
    def version(self) -> int:
        return self.catalogue.version

    @property
    def n_items(self) -> int:
        return self.catalogue.n_items


def index_catalogue(catalogue: ItemCatalogue, kind: str = "auto",
                    recall_m: int = 100) -> ServedCatalogue:  # fmt: skip
    """``catalogue`` with the faiss index of its features built (none when ``F == 0``)."""
    if catalogue.feature_dim == 0:
        return ServedCatalogue(catalogue)
    index = CatalogueIndex(catalogue.features_NF, kind=kind, recall_m=recall_m,
                           source=f"catalogue v{catalogue.version} features")  # fmt: skip
    return ServedCatalogue(catalogue, index)


class CatalogueSwap:
    """The newest catalogue offered, indexed off the request path and installed whole.

    ``install`` receives each built ``ServedCatalogue`` (the slate server's setter);
    ``build_pending`` builds in the caller's thread (the in-process round, the warm-up);
    ``run_until`` is the process's indexing thread.
    """

    def __init__(
        self,
        install: Callable[[ServedCatalogue], None],
        kind: str = "auto",
        recall_m: int = 100,
    ) -> None:
        self._install, self.kind, self.recall_m = install, kind, recall_m
        self.current: ServedCatalogue | None = None
        self._pending: ItemCatalogue | None = None
        self._cv = threading.Condition()
        self._build_lock = threading.Lock()
        self.swaps = 0
        self.failed = 0
        self.errors: deque[str] = deque(maxlen=20)

    def offer(self, catalogue: ItemCatalogue) -> bool:
        """Queue ``catalogue`` for indexing; False if it is not newer than what is queued or
        serving."""
        with self._cv:
            newest = max(self._version(self.current), self._version(self._pending))
            if catalogue.version <= newest:
                return False
            self._pending = catalogue
            self._cv.notify_all()
            return True

    @property
    def pending(self) -> bool:
        """Whether a catalogue waits for its index or is being indexed now."""
        with self._cv:
            return self._pending is not None or self._build_lock.locked()

    def build_pending(self) -> ServedCatalogue | None:
        """Index and install the waiting catalogue, if any; returns what was installed."""
        with self._build_lock:
            with self._cv:
                catalogue, self._pending = self._pending, None
            if catalogue is None:
                return None
            try:
                served = index_catalogue(catalogue, self.kind, self.recall_m)
            except Exception as exc:  # the catalogue serving now stays; say why
                self.failed += 1
                self.errors.append(f"index catalogue v{catalogue.version}: {exc!r}")
                log.exception("indexing catalogue v%d failed", catalogue.version)
                return None
            if served.version <= self._version(self.current):
                return None
            self.current = served
            self.swaps += 1
            self._install(served)
        report = served.index.report() if served.index is not None else {"kind": "none"}
        log.info("catalogue v%d (%d items x %d features) serving; index %s", served.version,
                 served.n_items, served.catalogue.feature_dim, report)  # fmt: skip
        return served

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def run_until(self, stop: threading.Event) -> None:
        while True:
            with self._cv:
                while self._pending is None and not stop.is_set():
                    self._cv.wait(timeout=0.5)
                if stop.is_set():
                    return
            self.build_pending()

    @staticmethod
    def _version(item: ServedCatalogue | ItemCatalogue | None) -> int:
        return 0 if item is None else item.version
