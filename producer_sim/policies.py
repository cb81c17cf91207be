"""Built-in baseline policies: uniform random, and a myopic oracle that knows the truth.

Both implement ``core.ports.SlatePolicy``. ``RandomPolicy`` logs honest propensities (each
candidate appears with probability k/N), so off-policy learners can use its traffic.
``MyopicOraclePolicy`` reads the world's ground truth: it ranks candidates by their true
click probability for this user (the user's observation *is* their interests in every
preset). It is the RecSim "myopic" baseline; it ignores how items change the session length.
"""

from __future__ import annotations

import numpy as np

from core.ports import Candidates, Observation, Slate
from producer_sim.world import World


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
        interests_D = observation.user_obs.astype(np.float64)
        affinity_N = candidates.features_NF @ interests_D
        # Click probability of each item shown alone: monotone in affinity for every choice
        # model here, so ranking by it ranks by true click probability.
        click_N = self._world.choice.probabilities(affinity_N[:, None])[:, 0]
        top_K = np.argpartition(-click_N, k - 1)[:k] if k < len(click_N) else np.arange(len(click_N))
        top_K = top_K[np.argsort(-click_N[top_K], kind="stable")]
        return Slate(
            items=candidates.ids[top_K].astype(np.int64),
            scores=click_N[top_K],
            propensities=np.ones(k),
        )
