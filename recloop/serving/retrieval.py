"""Candidate retrieval from the whole catalogue: a faiss inner-product index over item vectors.

When a request carries no candidate list, serving takes the top-M items by inner product
with a query vector (the policy's own ``query_vector(observation)`` if it has one, else the
user's observation when its size matches) and lets the policy rank those. The vectors are a
snapshot's learned ``item_embeddings()`` where it has them, else the catalogue's features
(``serving.items``); either index is built off the request path and swapped in whole.

Index kinds: ``flat`` (exact, ``IndexFlatIP``), ``hnsw`` (graph, approximate) and ``ivf``
(inverted lists, approximate). ``auto`` chooses by size: exact up to ``EXACT_LIMIT`` items,
where one exact search of a 32-d catalogue still costs about a millisecond, IVF above it.

Why IVF and not HNSW above the limit: a real catalogue is clustered (topics), and HNSW's
graph holds its recall poorly there. On ``large_catalogue`` at 1M items (100 clusters of unit
vectors) HNSW (M 32) reached recall@100 0.54 at efSearch 1024 after an 88 s build, where
IVF-Flat with 4,000 lists reaches 0.98 probing 128 of them, 0.5 ms a query, built in 41 s
(2 cores). On structureless data (uniform unit vectors) the order flips (IVF needs about a
quarter of its lists for 0.95): ``hnsw`` remains a kind one can ask for.

Every approximate index measures its recall@M against exact search when it is built: on
``RECALL_QUERIES`` queries (``sample_queries``: half drawn per dimension from the vectors'
mean and spread, half items' own vectors jittered, so both directions between clusters and
directions into one are asked), the share of the exact top-M it returns, in whichever half
it is lower. The index then
widens its search until that recall reaches ``recall_target``: HNSW its depth (``efSearch``,
``EF_SEARCH``), IVF the lists it probes (``nprobe``, ``NPROBE_SHARES`` of its lists), so the
search is the cheapest that buys the recall asked for on this catalogue; where even the
widest misses it, the recall reached is what is reported. An exact index's recall is 1 by
construction and is not measured. ``report()`` says what was chosen and why.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

EXACT_LIMIT = 250_000
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
RECALL_QUERIES = 200
"""Queries of the recall measurement at build time."""
RECALL_TARGET = 0.97
"""Recall@M an HNSW index deepens its search to reach (above the 0.95 serving promises, so
queries unlike the sample still get it)."""
EF_SEARCH = (128, 192, 256, 384, 512, 768, 1024)
"""HNSW search depths tried, shallowest first (steps of about 1.5x: a search costs about
linearly in its depth, so no deeper than needed)."""
NPROBE_SHARES = (1 / 64, 1 / 48, 1 / 32, 1 / 24, 1 / 16, 1 / 12, 1 / 8, 1 / 6, 1 / 4, 1 / 3,
                 1 / 2, 1.0)  # fmt: skip
"""Shares of an IVF index's lists probed, fewest first (a search costs linearly in them)."""
IVF_TRAIN_PER_LIST = 64
"""k-means training rows per IVF list (a seeded sample; faiss's own default is 256)."""


class CatalogueIndex:
    """Top-M inner-product search over ``embeddings_ND`` (row i is item id i).

    ``recall_m`` is the M of the recall measured at build time (serving's retrieval size);
    ``recall`` is that measurement (1.0 for an exact index); ``build_s`` the build's seconds.
    """

    def __init__(
        self,
        embeddings_ND: np.ndarray,
        kind: str = "auto",
        hnsw_m: int = 32,
        *,
        recall_m: int = 100,
        recall_target: float = RECALL_TARGET,
        exact_limit: int = EXACT_LIMIT,
        seed: int = 0,
        source: str = "",
    ) -> None:
        t0 = time.perf_counter()
        embeddings_ND = np.ascontiguousarray(embeddings_ND, dtype=np.float32)
        if embeddings_ND.ndim != 2 or embeddings_ND.shape[0] < 1 or embeddings_ND.shape[1] < 1:
            raise ValueError(
                f"item embeddings must be a non-empty (N, D) array, got {embeddings_ND.shape}"
            )
        if not np.all(np.isfinite(embeddings_ND)):
            raise ValueError("item embeddings contain NaN or infinity")
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind {kind!r}; choose one of {INDEX_KINDS}")
        n, d = embeddings_ND.shape
        self.requested = kind
        if kind == "auto":
            kind = "flat" if n <= exact_limit else "ivf"
        self.kind, self.source = kind, source
        self.n_items, self.dim = n, d
        self.recall_m = min(recall_m, n)
        self._index = _build(embeddings_ND, kind, hnsw_m, seed)
        self.ef_search: int | None = None
        self.nprobe: int | None = None
        self.recall = 1.0
        if kind != "flat":
            queries_QD = sample_queries(embeddings_ND, RECALL_QUERIES, seed)
            exact_QM = exact_top(embeddings_ND, queries_QD, self.recall_m)
            self.recall = self._tune(queries_QD, exact_QM, recall_target)
        self.build_s = time.perf_counter() - t0

    def _tune(self, queries_QD: np.ndarray, exact_QM: np.ndarray, target: float) -> float:
        """Widen the search step by step until recall reaches ``target``; returns the recall."""
        half = len(queries_QD) // 2

        def measured() -> float:
            found_QM = self.search(queries_QD, self.recall_m)[0]
            return min(recall_of(found_QM[:half], exact_QM[:half]),
                       recall_of(found_QM[half:], exact_QM[half:]))  # fmt: skip

        # One knob per kind, widened in its own steps: HNSW's depth, IVF's probed lists.
        knob: Any
        steps: tuple[int, ...]
        if self.kind == "hnsw":
            hnsw: Any = faiss.downcast_index(self._index)
            knob, name, steps = hnsw.hnsw, "efSearch", EF_SEARCH
        else:
            knob = faiss.extract_index_ivf(self._index)
            name, steps = "nprobe", tuple(probe_counts(knob.nlist))
        recall = 0.0
        for step in steps:
            setattr(knob, name, step)
            if (recall := measured()) >= target:
                break
        if self.kind == "hnsw":
            self.ef_search = int(knob.efSearch)
        else:
            self.nprobe = int(knob.nprobe)
        return recall

    def search(self, queries_QD: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``m`` item ids and inner products per query, best first: ``(ids_QM, scores_QM)``.

        ``m`` is capped at the catalogue size; approximate kinds may return -1 for missing
        neighbours, which callers drop.
        """
        queries_QD = np.ascontiguousarray(queries_QD, dtype=np.float32).reshape(-1, self.dim)
        m = min(m, self.n_items)
        scores_QM, ids_QM = self._index.search(queries_QD, m)
        return ids_QM.astype(np.int64), scores_QM

    def report(self) -> dict[str, object]:
        """What was built and how well it recalls (for the log and the serve stats)."""
        return {
            "kind": self.kind, "requested": self.requested, "source": self.source,
            "n_items": self.n_items, "dim": self.dim, "recall_m": self.recall_m,
            "recall": round(self.recall, 4), "measured": self.kind != "flat",
            "ef_search": self.ef_search, "nprobe": self.nprobe,
            "build_s": round(self.build_s, 3),
        }  # fmt: skip


def sample_queries(embeddings_ND: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` queries: the first half drawn per dimension from the vectors' own mean and
    spread (directions between clusters), the rest rows of the vectors jittered by a quarter
    of that spread (directions into a cluster, where its dense top-M is hardest to get)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EC]))
    mean_D = embeddings_ND.mean(axis=0)
    std_D = embeddings_ND.std(axis=0) + 1e-6
    d, spread = embeddings_ND.shape[1], count // 2
    between_QD = mean_D + std_D * rng.standard_normal((spread, d))
    rows = rng.integers(0, embeddings_ND.shape[0], size=count - spread)
    into_QD = embeddings_ND[rows] + 0.25 * std_D * rng.standard_normal((count - spread, d))
    return np.vstack([between_QD, into_QD]).astype(np.float32)


def probe_counts(nlist: int) -> list[int]:
    """The IVF probe counts ``_tune`` tries for ``nlist`` lists, fewest first."""
    return sorted({max(1, min(nlist, round(nlist * share))) for share in NPROBE_SHARES})


def exact_top(embeddings_ND: np.ndarray, queries_QD: np.ndarray, m: int) -> np.ndarray:
    """The exact top-``m`` ids by inner product of each query (brute force, no index copy)."""
    _, ids_QM = faiss.knn(np.ascontiguousarray(queries_QD, dtype=np.float32),
                          np.ascontiguousarray(embeddings_ND, dtype=np.float32), m,
                          metric=faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    return ids_QM.astype(np.int64)


def recall_of(found_QM: np.ndarray, exact_QM: np.ndarray) -> float:
    """Mean share of each query's exact top-M that ``found_QM`` holds (-1s count as misses)."""
    hits = [np.intersect1d(f[f >= 0], e).shape[0] for f, e in zip(found_QM, exact_QM, strict=True)]
    return float(np.sum(hits) / max(exact_QM.size, 1))


def _build(embeddings_ND: np.ndarray, kind: str, hnsw_m: int, seed: int) -> faiss.Index:
    n, d = embeddings_ND.shape
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = EF_SEARCH[0]
        index = hnsw
    else:
        # faiss wants ~39 training points per list; 4·sqrt(n) lists is its usual advice.
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1F]))
        rows = min(n, IVF_TRAIN_PER_LIST * nlist)
        sample = rng.choice(n, rows, replace=False) if rows < n else np.arange(n)
        index.train(embeddings_ND[np.sort(sample)])
    index.add(embeddings_ND)
    return index
