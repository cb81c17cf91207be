"""The user model: hidden interests and a time budget, stepped for many users at once.

This is RecSim's interest-evolution user (``IEvUserModel`` with ``UtilityModelUserSampler``),
vectorised over users:

- state: interests u ∈ [-1, 1]^D and a time budget b (200 minutes);
- observation: the interests themselves, to 6 decimals (RecSim exposes them too);
- affinity for an item with features f: ⟨u, f⟩ (the choice model turns it into clicks);
- response: a click on item d watches w = min(b, length_d); the reward is w;
- state update on a click: b ← b − w + ρ·w·quality_d (ρ = 0.9/3.4, "about 0.26"), and the
  interests move by Δ = α(u)·f·(f − u) with α(u) = η·(1 − |u|) (η = 0.3), towards the item
  (u += Δ) with probability ⟨(u + 1)/2, f⟩ and away from it (u −= Δ) otherwise, then clipped;
- no click: b ← b − no_click_cost (0.5);
- termination: b ≤ 0.

Deviation from RecSim: the coin flip of the interest update uses the user model's own
generator instead of NumPy's global one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserConfig:
    """Parameters of the interest-evolution user model."""

    dim: int = 20
    """Length of the interest vector; must equal the item feature dimension."""
    time_budget: float = 200.0
    """Minutes a fresh user is willing to spend."""
    no_click_cost: float = 0.5
    """Budget lost on a slate that gets no click."""
    budget_refund_rate: float = 0.9 / 3.4
    """ρ: share of the watch time, times the item quality, refunded to the budget on a click."""
    interest_step: float = 0.3
    """η: the largest interest move (at u = 0); 0 freezes interests."""
    prototypes: tuple[tuple[float, ...], ...] = ()
    """If set, each user's interests are one of these vectors (uniform), else U[-1, 1]^dim."""


@dataclass
class Population:
    """The hidden state of a fixed number of user slots, one row per slot.

    Slots are refilled with fresh users as sessions end. ``serial`` numbers users in the order
    they were sampled, so that ids and event order are reproducible.
    """

    interests_UD: np.ndarray
    budget_U: np.ndarray
    steps_U: np.ndarray
    return_U: np.ndarray
    clicks_U: np.ndarray
    clicked_quality_U: np.ndarray
    serial_U: np.ndarray
    active_U: np.ndarray

    @classmethod
    def empty(cls, capacity: int, dim: int) -> Population:
        return cls(
            interests_UD=np.zeros((capacity, dim)),
            budget_U=np.zeros(capacity),
            steps_U=np.zeros(capacity, dtype=np.int64),
            return_U=np.zeros(capacity),
            clicks_U=np.zeros(capacity, dtype=np.int64),
            clicked_quality_U=np.zeros(capacity),
            serial_U=np.full(capacity, -1, dtype=np.int64),
            active_U=np.zeros(capacity, dtype=bool),
        )

    @property
    def capacity(self) -> int:
        return int(self.budget_U.shape[0])


class InterestUsers:
    """The interest-evolution user model; every method works on a batch of user slots."""

    def __init__(self, config: UserConfig) -> None:
        self.config = config
        self._prototypes_PD = (
            np.asarray(config.prototypes, dtype=np.float64) if config.prototypes else None
        )
        if self._prototypes_PD is not None and self._prototypes_PD.shape[1] != config.dim:
            raise ValueError("prototype length must equal the user dimension")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Interests (n, D) and budgets (n,) of ``n`` fresh users."""
        cfg = self.config
        if self._prototypes_PD is None:
            interests_nD = rng.uniform(-1.0, 1.0, size=(n, cfg.dim))
        else:
            interests_nD = self._prototypes_PD[rng.integers(0, len(self._prototypes_PD), n)]
        return interests_nD, np.full(n, cfg.time_budget)

    @staticmethod
    def observe(interests_UD: np.ndarray) -> np.ndarray:
        """What the recommender may see: the interests, rounded to 6 decimals (float64).

        Rounded so that the wire carries short decimals rather than 17-digit noise, and an
        in-process policy sees exactly the values serving decodes from a RecRequest.
        """
        return np.round(interests_UD, 6)

    @staticmethod
    def affinity(interests_UD: np.ndarray, features_UKF: np.ndarray) -> np.ndarray:
        """⟨u, f⟩ for every slate item, shape (U, K)."""
        return np.einsum("ud,ukd->uk", interests_UD, features_UKF)

    def update_interests(
        self, interests_UD: np.ndarray, features_UD: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """New interests after each user clicked the item whose features are ``features_UD``."""
        if self.config.interest_step == 0.0:
            return interests_UD
        alpha_UD = self.config.interest_step * (1.0 - np.abs(interests_UD))
        delta_UD = alpha_UD * features_UD * (features_UD - interests_UD)
        toward_U = ((interests_UD + 1.0) / 2.0 * features_UD).sum(axis=1)
        sign_U = np.where(rng.random(interests_UD.shape[0]) < toward_U, 1.0, -1.0)
        return np.clip(interests_UD + sign_U[:, None] * delta_UD, -1.0, 1.0)

    def spend(
        self,
        budget_U: np.ndarray,
        clicked_U: np.ndarray,
        watch_U: np.ndarray,
        quality_U: np.ndarray,
    ) -> np.ndarray:
        """Budget after one step: watch time minus the quality refund, or the no-click cost."""
        cfg = self.config
        after_click_U = budget_U - watch_U + cfg.budget_refund_rate * watch_U * quality_U
        return np.where(clicked_U, after_click_U, budget_U - cfg.no_click_cost)
