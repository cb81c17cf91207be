"""The policies serving uses before any snapshot exists, with their exact propensities.

Both are honest about how they draw: every logged propensity is the true probability that
the item is in the slate, which off-policy learners need to correct for how data was
collected.

- ``UniformPolicy``: K distinct candidates uniformly at random. Every K-subset of the N
  candidates is equally likely, so each item's inclusion probability is K / N.
- ``PopularityPolicy``: the K candidates seen most often. Items strictly above the K-th
  count are always shown (propensity 1); the r remaining places go to r of the m items tied
  at that count, chosen uniformly, so each tied item is shown with probability r / m. With
  no counts yet every candidate is tied and this is the uniform policy.
"""

from __future__ import annotations

import threading

import numpy as np

from recloop.core.ports import Candidates, Observation, Slate

FALLBACK_NAMES = ("uniform", "popularity")
"""The fallbacks ``--fallback`` accepts."""


class UniformPolicy:
    """K distinct candidates uniformly at random; propensity K / N each."""

    version = 0

    def __init__(self, rng: np.random.Generator, name: str = "uniform") -> None:
        self.name = name
        self._rng = rng

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        n = len(candidates)
        picks_K = self._rng.choice(n, size=k, replace=False)
        return Slate(
            items=candidates.ids[picks_K].astype(np.int64),
            scores=np.zeros(k),
            propensities=np.full(k, k / n),
        )

    def item_embeddings(self) -> None:
        return None


UNKNOWN_CATALOGUE_ITEMS = 1 << 20
"""How many item ids (``0 .. n - 1``) are counted when the catalogue's size is not known."""


class PopularityCounts:
    """How often each item was chosen (clicked), as seen in session state.

    Item ids index a dense array; writes come from the session-state thread and reads from
    the request path, so a lock keeps the array swap safe. The ids come from the wire (the
    compacted ``session.state`` topic, which anyone who can write to Kafka can write), so
    none sizes the array: with the catalogue's size known the array is that size from the
    start, without it grows on demand up to ``UNKNOWN_CATALOGUE_ITEMS``. An id outside
    (negative, past the catalogue, or too large even for int64) is not counted, only
    tallied in ``ignored``.
    """

    def __init__(self, n_items: int = 0) -> None:
        self.n_items = n_items
        self.limit = n_items if n_items > 0 else UNKNOWN_CATALOGUE_ITEMS
        """Ids ``0 .. limit - 1`` are counted."""
        self._counts = np.zeros(max(n_items, 1), dtype=np.int64)
        self._lock = threading.Lock()
        self.total = 0
        self.ignored = 0

    def add(self, items: list[int] | np.ndarray) -> None:
        # Range-checked before any conversion: an id past int64 would not even convert.
        limit = self.limit
        known = [int(i) for i in items if 0 <= i < limit]
        self.ignored += len(items) - len(known)
        if not known:
            return
        items_I = np.asarray(known, dtype=np.int64)
        with self._lock:
            top = int(items_I.max())
            if top >= self._counts.shape[0]:
                grown = np.zeros(min(max(top + 1, 2 * self._counts.shape[0]), limit), np.int64)
                grown[: self._counts.shape[0]] = self._counts
                self._counts = grown
            np.add.at(self._counts, items_I, 1)
            self.total += int(items_I.size)

    def follow_catalogue(self, n_items: int) -> None:
        """Count ids ``0 .. n_items - 1`` from now on (the catalogue serving answers from)."""
        self.n_items = self.limit = n_items

    def get(self, ids_N: np.ndarray) -> np.ndarray:
        """Counts of ``ids_N`` (0 for ids never seen)."""
        counts = self._counts  # one read: a concurrent grow replaces, never mutates, the array
        out_N = np.zeros(ids_N.shape[0], dtype=np.int64)
        known_N = (ids_N >= 0) & (ids_N < counts.shape[0])
        out_N[known_N] = counts[ids_N[known_N]]
        return out_N


def history_increment(old: list[int], new: list[int]) -> list[int]:
    """Items appended to a bounded, oldest-first history window going from ``old`` to ``new``.

    The window drops its oldest items as new ones arrive, so the new items are what follows
    the longest suffix of ``old`` that is a prefix of ``new``.
    """
    for overlap in range(min(len(old), len(new)), 0, -1):
        if old[len(old) - overlap :] == new[:overlap]:
            return new[overlap:]
    return list(new)


class PopularityPolicy:
    """Top-K candidates by count, ties at the boundary broken uniformly (exact propensities)."""

    version = 0

    def __init__(
        self, counts: PopularityCounts, rng: np.random.Generator, name: str = "popularity"
    ) -> None:
        self.name = name
        self._counts = counts
        self._rng = rng

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        counts_N = self._counts.get(candidates.ids)
        # Sort by count descending; a random permutation first makes tie order uniform.
        perm_N = self._rng.permutation(len(candidates))
        order_N = perm_N[np.argsort(-counts_N[perm_N], kind="stable")]
        chosen_K = order_N[:k]
        boundary = counts_N[order_N[k - 1]]
        above = int(np.sum(counts_N > boundary))
        tied = int(np.sum(counts_N == boundary))
        propensities_K = np.where(counts_N[chosen_K] > boundary, 1.0, (k - above) / tied)
        return Slate(
            items=candidates.ids[chosen_K].astype(np.int64),
            scores=counts_N[chosen_K].astype(np.float64),
            propensities=propensities_K,
        )

    def item_embeddings(self) -> None:
        return None
