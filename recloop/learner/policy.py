"""What every served policy shares: a name and version for the logs, the ``explore`` switch,
an exploration generator of its own, and ``recommend`` itself.

``recommend`` is written once (River's ``pull``/``_pull``): the public method checks the
request, builds the request batch, and assembles the ``Slate``; an algorithm supplies

- ``_score(req, candidates, k) -> Ranking``: its judgement of the request without exploration
  (which items it ranks, its greedy order, how to score a served item);
- ``_pull(ranking, k) -> (positions_K, propensities_K)``: the slate it serves; by default
  ε-uniform around the greedy top K (``maths.epsilon_slate``, honest inclusion propensities),
  with ε = 0 while ``explore`` is off;
- ``_candidates(candidates)``: what an empty candidate list ranks; by default the whole
  catalogue with ``item_features`` (DRR and Wolpertinger search their own item table instead).

Item features at serving. Serving builds ``Candidates`` itself, with each candidate's row of
the catalogue, so a request with candidates is ranked on exactly the features the learner
trained on, and a policy needs no catalogue for it. A policy that still gets an EMPTY list
ranks every item with the features it holds: by default those of its ``catalogue``
(``set_catalogue``; the learning agent shares its own with its live policy, a loaded policy
gets one only if the caller sets it), through ``item_features``. It never ranks them on zeros:
in a world with item features, a policy without a catalogue refuses such a request with a
``ValueError`` that says so (an id-only world, F = 0, needs none).

Random streams. The generator is ``default_rng(SeedSequence([seed, stream]))``: the agent's
seed and a stream number that each algorithm names as a constant of its module
(``EXPLORATION_STREAM``). Distinct streams keep two algorithms built with the same seed, as the
arms of an A/B test usually are, from drawing the same exploration coins, and keep serving
draws apart from the replay's (``default_rng(seed)``). The numbers in use, one each:

    mf 5 · slateq 7 · slateq_myopic 19 · wolpertinger 11 · drr 13 · reinforce 17

A snapshot carries the generator's state as ``policy_rng``, so a resumed or served copy draws
on from where the learner's own policy was, whatever the stream it started from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from recloop.core.catalogue import ItemCatalogue
from recloop.core.ports import Candidates, Observation, Slate
from recloop.core.spec import WorldSpec
from recloop.learner.batch import RequestBatch, item_features, request_batch
from recloop.learner.maths import epsilon_slate


@dataclass(frozen=True)
class Ranking:
    """An algorithm's judgement of one request, before exploration.

    ``ids_N`` are the items ranked (the request's candidates, or the catalogue); ``order`` are
    positions in ``ids_N``, best first: at least the greedy slate's K (SlateQ's selectors give
    exactly their slate, REINFORCE gives every item, since its sampling needs the full order);
    ``score_of`` maps served positions to their scores (Wolpertinger scores only what it
    serves: critic values for the whole catalogue would undo its kNN).
    """

    ids_N: np.ndarray
    order: np.ndarray
    score_of: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def dense(cls, ids_N: np.ndarray, order: np.ndarray, scores_N: np.ndarray) -> Ranking:
        """A ranking that scored every item: ``score_of`` indexes ``scores_N``."""
        return cls(ids_N, order, lambda idx: scores_N[idx])


class SeededPolicy:
    """Base of the algorithms' policies: they add their networks, ``_score`` and, where
    they explore otherwise than ε-uniformly, ``_pull``."""

    spec: WorldSpec
    epsilon: float = 0.0  # the default _pull's ε; algorithms set it from their Config
    catalogue: ItemCatalogue | None = None  # item features for requests without candidates

    def __init__(self, name: str, version: int, seed: int, stream: int) -> None:
        self.name, self.version, self.stream = name, version, stream
        self.explore = True
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
        self._whole: tuple[ItemCatalogue | None, Candidates] | None = None

    @torch.no_grad()
    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        """K distinct items of ``candidates`` (all items if it is empty) with scores and the
        propensity each had of being served."""
        n = len(candidates) or self.spec.n_items
        if not 1 <= k <= n:
            raise ValueError(f"{self.name}: a slate of k={k} needs 1 <= k <= {n} candidates")
        ranked = self._candidates(candidates)
        ranking = self._score(request_batch(observation, ranked, self.spec), ranked, k)
        idx_K, prop_K = self._pull(ranking, k)
        idx_K = np.asarray(idx_K, np.int64)
        return Slate(items=ranking.ids_N[idx_K].astype(np.int64),
                     scores=np.asarray(ranking.score_of(idx_K)).astype(np.float64),
                     propensities=prop_K)

    def set_catalogue(self, catalogue: ItemCatalogue | None) -> None:
        """Rank requests without candidates with ``catalogue``'s features from now on (its
        width must be the spec's F)."""
        if catalogue is not None and catalogue.feature_dim != self.spec.item_feature_dim:
            raise ValueError(f"{self.name}: catalogue v{catalogue.version} has "
                             f"{catalogue.feature_dim} item features, the spec "
                             f"{self.spec.item_feature_dim}")
        self.catalogue = catalogue

    def item_features(self, ids: np.ndarray) -> np.ndarray:
        """The features this policy ranks ``ids`` with when a request does not carry them
        (module docstring): its catalogue's rows; refused in a featured world without one."""
        if self.catalogue is None and self.spec.item_feature_dim:
            raise ValueError(f"{self.name}: a request without candidates in a world with "
                             f"{self.spec.item_feature_dim} item features needs a catalogue "
                             "(set_catalogue), or Candidates with the catalogue's features")
        return item_features(np.asarray(ids, np.int64), self.spec, self.catalogue)

    def _candidates(self, candidates: Candidates) -> Candidates:
        """What the request ranks: an empty list means every item, with ``item_features``
        (built once per catalogue: a million-row copy per request would be the request)."""
        if len(candidates):
            return candidates
        if self._whole is None or self._whole[0] is not self.catalogue:
            ids_N = np.arange(self.spec.n_items, dtype=np.int64)
            self._whole = (self.catalogue, Candidates(ids_N, self.item_features(ids_N)))
        return self._whole[1]

    def _score(self, req: RequestBatch, candidates: Candidates, k: int) -> Ranking:
        raise NotImplementedError

    def _pull(self, ranking: Ranking, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ε-uniform around the greedy top K of the ranking."""
        return self.epsilon_explore(ranking.order[:k], len(ranking.ids_N), self.epsilon)

    def epsilon_explore(self, top_K: np.ndarray, n: int,
                        epsilon: float) -> tuple[np.ndarray, np.ndarray]:
        """``maths.epsilon_slate`` around the greedy ``top_K`` of n items, with ε = 0 while
        ``explore`` is off: (indices_K, propensities_K)."""
        return epsilon_slate(top_K, n, epsilon if self.explore else 0.0, self.rng)
