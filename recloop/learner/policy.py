"""What every served policy shares: a name and version for the logs, the ``explore`` switch
and an exploration generator of its own.

The generator is seeded from the agent's seed and a per-algorithm stream number, so serving
draws never shift the replay's draws, and a snapshot carries it as ``policy_rng``.
"""

from __future__ import annotations

import numpy as np

from recloop.learner.maths import epsilon_slate


class SeededPolicy:
    """Base of the algorithms' policies: they add their networks and ``recommend``."""

    def __init__(self, name: str, version: int, seed: int, stream: int) -> None:
        self.name, self.version = name, version
        self.explore = True
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))

    def epsilon_explore(self, top_K: np.ndarray, n: int,
                        epsilon: float) -> tuple[np.ndarray, np.ndarray]:
        """``maths.epsilon_slate`` around the greedy ``top_K`` of n items, with ε = 0 while
        ``explore`` is off: (indices_K, propensities_K)."""
        return epsilon_slate(top_K, n, epsilon if self.explore else 0.0, self.rng)
