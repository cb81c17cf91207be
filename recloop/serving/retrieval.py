"""Candidate retrieval from the whole catalogue: a faiss inner-product index over item embeddings.

When a request carries no candidate list, serving takes the top-M items by inner product
with a query vector (the policy's own ``query_vector(observation)`` if it has one, else the
user's observation when its size matches) and lets the policy rank those. The index is
rebuilt from each snapshot's ``item_embeddings()`` off the request path.

Index kinds: ``flat`` (exact, ``IndexFlatIP``), ``hnsw`` (graph, approximate) and ``ivf``
(inverted lists, approximate). ``auto`` is exact up to ``EXACT_LIMIT`` items, where one
exact search of a 32-d catalogue still costs about a millisecond, and HNSW above it.
"""

from __future__ import annotations

import faiss
import numpy as np

EXACT_LIMIT = 250_000
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")


class CatalogueIndex:
    """Top-M inner-product search over ``embeddings_ND`` (row i is item id i)."""

    def __init__(self, embeddings_ND: np.ndarray, kind: str = "auto", hnsw_m: int = 32) -> None:
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
        if kind == "auto":
            kind = "flat" if n <= EXACT_LIMIT else "hnsw"
        self.kind = kind
        self.n_items, self.dim = n, d
        self._index = _build(embeddings_ND, kind, hnsw_m)

    def search(self, queries_QD: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``m`` item ids and inner products per query, best first: ``(ids_QM, scores_QM)``.

        ``m`` is capped at the catalogue size; approximate kinds may return -1 for missing
        neighbours, which callers drop.
        """
        queries_QD = np.ascontiguousarray(queries_QD, dtype=np.float32).reshape(-1, self.dim)
        m = min(m, self.n_items)
        scores_QM, ids_QM = self._index.search(queries_QD, m)
        return ids_QM.astype(np.int64), scores_QM


def _build(embeddings_ND: np.ndarray, kind: str, hnsw_m: int) -> faiss.Index:
    n, d = embeddings_ND.shape
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 128
        index = hnsw
    else:
        # faiss wants ~39 training points per list; 4·sqrt(n) lists is its usual advice.
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings_ND)
        faiss.extract_index_ivf(index).nprobe = max(1, nlist // 8)
    index.add(embeddings_ND)
    return index
