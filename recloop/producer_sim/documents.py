"""The document model: a catalogue of items and the candidate sets users are offered.

An item has a cluster (topic), a hidden quality, a length (how long watching it takes) and an
observable feature vector. RecSim's interest-evolution world samples fresh documents every
step; here the catalogue is finite and every item keeps its id across Kafka messages, and
candidate sets are drawn uniformly from it. With a few hundred items per cluster the
candidates' distribution is the one RecSim draws from. A world may also replace some of its
documents as it runs (``World.resample_every``): the new ones get new ids after the last
(``Catalogue.extended``) and retire as many of the oldest, so ids are never reused.

Builders take their own ``numpy.random.Generator`` and never touch global random state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Catalogue:
    """Every item of a world, as parallel arrays indexed by item id (0..N-1)."""

    cluster_N: np.ndarray  # int64, shape (N,)
    quality_N: np.ndarray  # float64, shape (N,): hidden, drives the session length
    length_N: np.ndarray  # float64, shape (N,): watch time of a full view
    features_NF: np.ndarray  # float32, shape (N, F): what recommenders may see

    def __post_init__(self) -> None:
        n = self.cluster_N.shape[0]
        for name in ("quality_N", "length_N", "features_NF"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"catalogue arrays disagree on the item count ({name})")

    @property
    def n_items(self) -> int:
        return int(self.cluster_N.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features_NF.shape[1])

    def features(self, ids: np.ndarray) -> np.ndarray:
        """Observable features of ``ids`` (any shape), shape ``ids.shape + (F,)``."""
        return self.features_NF[np.asarray(ids, dtype=np.int64)]

    def extended(self, new: Catalogue) -> Catalogue:
        """This catalogue with ``new``'s items after its own (ids ``N .. N + M - 1``)."""
        if new.feature_dim != self.feature_dim:
            raise ValueError(
                f"new documents have {new.feature_dim} features, not {self.feature_dim}"
            )
        return Catalogue(*(np.concatenate([getattr(self, f), getattr(new, f)])
                           for f in ("cluster_N", "quality_N", "length_N", "features_NF")))  # fmt: skip


def cluster_catalogue(
    n_items: int,
    cluster_quality_means: np.ndarray,
    quality_std: float,
    length: float,
    rng: np.random.Generator,
) -> Catalogue:
    """Items one-hot by a uniformly drawn cluster, quality ~ N(mean of the cluster, std).

    This is RecSim's ``UtilityModelVideoSampler`` document distribution (its "variance" of
    0.1 is used as a standard deviation there, and here).
    """
    n_clusters = int(len(cluster_quality_means))
    cluster_N = rng.integers(0, n_clusters, size=n_items)
    quality_N = rng.normal(np.asarray(cluster_quality_means)[cluster_N], quality_std)
    features_NF = np.zeros((n_items, n_clusters), dtype=np.float32)
    features_NF[np.arange(n_items), cluster_N] = 1.0
    return Catalogue(cluster_N, quality_N, np.full(n_items, float(length)), features_NF)


def embedding_catalogue(
    n_items: int,
    n_clusters: int,
    dim: int,
    spread: float,
    cluster_quality_means: np.ndarray,
    quality_std: float,
    length: float,
    rng: np.random.Generator,
) -> Catalogue:
    """Items with unit-norm embeddings scattered (``spread``) around random cluster centres.

    Used for large catalogues, where a recommender must retrieve by nearest neighbours.
    """
    centres_CD = rng.normal(size=(n_clusters, dim))
    centres_CD /= np.linalg.norm(centres_CD, axis=1, keepdims=True)
    cluster_N = rng.integers(0, n_clusters, size=n_items)
    emb_ND = centres_CD[cluster_N] + spread * rng.normal(size=(n_items, dim)) / np.sqrt(dim)
    emb_ND /= np.linalg.norm(emb_ND, axis=1, keepdims=True)
    quality_N = rng.normal(np.asarray(cluster_quality_means)[cluster_N], quality_std)
    return Catalogue(
        cluster_N, quality_N, np.full(n_items, float(length)), emb_ND.astype(np.float32)
    )


def sample_candidates(
    n_items: int, n_users: int, n_candidates: int, rng: np.random.Generator
) -> np.ndarray:
    """``n_candidates`` distinct item ids per user, uniformly, shape (U, C) int64."""
    if not 0 < n_candidates <= n_items:
        raise ValueError(f"need 0 < candidates ({n_candidates}) <= items ({n_items})")
    if n_candidates * 4 > n_items:
        # Dense case: a random permutation per user (random keys, argsort), cut to C.
        keys_UN = rng.random((n_users, n_items))
        return np.argsort(keys_UN, axis=1)[:, :n_candidates].astype(np.int64)
    # Sparse case: draw with replacement and redraw the rare rows that hold a duplicate.
    ids_UC = rng.integers(0, n_items, size=(n_users, n_candidates))
    while True:
        sorted_UC = np.sort(ids_UC, axis=1)
        dup_U = (sorted_UC[:, 1:] == sorted_UC[:, :-1]).any(axis=1)
        if not dup_U.any():
            return ids_UC.astype(np.int64)
        ids_UC[dup_U] = rng.integers(0, n_items, size=(int(dup_U.sum()), n_candidates))
