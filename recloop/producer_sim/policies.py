"""Built-in baseline policies: uniform random, and a myopic oracle that knows the truth.

Both implement ``recloop.core.ports.SlatePolicy``. ``RandomPolicy`` logs honest propensities (each
candidate appears with probability k/N), so off-policy learners can use its traffic.
``MyopicOraclePolicy`` reads the world's ground truth: it ranks candidates by their true
click probability for this user (the user's observation *is* their interests in every
preset). It is the RecSim "myopic" baseline; it ignores how items change the session length.
"""

from __future__ import annotations

import numpy as np

from recloop.core.ports import Candidates, Observation, Slate
from recloop.producer_sim.world import World


class RandomPolicy:
    """k distinct candidates, uniformly at random, with their true inclusion probability."""

    def __init__(self, seed: int = 0, name: str = "random", version: int = 0) -> None:
        self.name = name
        self.version = version
        self._rng = np.random.default_rng(seed)

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        n = len(candidates)
        if not 1 <= k <= n:
            raise ValueError(f"cannot pick {k} of {n} candidates")
        picked_K = self._rng.choice(n, size=k, replace=False)
        return Slate(
            items=candidates.ids[picked_K].astype(np.int64),
            scores=np.zeros(k),
            propensities=np.full(k, k / n),
        )


class MyopicOraclePolicy:
    """Top-k candidates by true click probability (a baseline that cheats on purpose)."""

    def __init__(self, world: World, name: str = "myopic_oracle", version: int = 0) -> None:
        self.name = name
        self.version = version
        self._world = world

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        interests_D = observation.user_obs.astype(candidates.features_NF.dtype)
        affinity_N = candidates.features_NF @ interests_D
        # Every choice model here gives a lone item a click probability that rises with its
        # affinity, so the top-k by affinity are the top-k by true click probability.
        n = affinity_N.shape[0]
        top_K = np.argpartition(-affinity_N, k - 1)[:k] if k < n else np.arange(n)
        top_K = top_K[np.argsort(-affinity_N[top_K], kind="stable")]
        click_K = self._world.choice.probabilities(affinity_N[top_K, None].astype(np.float64))[:, 0]
        return Slate(
            items=candidates.ids[top_K].astype(np.int64),
            scores=click_K,
            propensities=np.ones(k),
        )
