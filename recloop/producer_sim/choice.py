"""Choice models: given a user's affinity for each slate item, who clicks what (or nothing).

Each model maps affinities ``affinity_UK`` (U users, K slate positions) to probabilities
``probs_UK1`` of shape (U, K + 1), whose last column is the probability of no click, and
``sample`` draws one outcome per user from them with a caller-owned generator.

- ``MultinomialLogit``:        p_i = exp(s·a_i) / (sum_j exp(s·a_j) + exp(null_logit))
- ``MultinomialProportional``: p_i = (a_i - m) / (sum_j (a_j - m) + (no_click_mass - m)),
  with ``m`` the min_normalizer (RecSim's interest-evolution choice: m = -1, mass 1, so
  scores are a_i + 1 and the null score is 2)
- ``Cascade``: the user scans in order; examines position i with ``attention_prob`` if
  nothing before was clicked and clicks it with probability ``score_scaling · (a_i - m)``:
  p_i = prod_{j<i} (1 - att·c_j) · att·c_i,  p_null = prod_j (1 - att·c_j).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ChoiceModel(Protocol):
    """Turns affinities into click probabilities (last column: no click)."""

    def probabilities(self, affinity_UK: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class MultinomialLogit:
    """Softmax over the slate's scaled affinities and a null logit."""

    null_logit: float = 0.0
    """Logit of choosing nothing; higher means fewer clicks."""
    scale: float = 1.0
    """Multiplies affinities before the softmax (an inverse temperature)."""

    def probabilities(self, affinity_UK: np.ndarray) -> np.ndarray:
        logits_UK1 = np.concatenate(
            [self.scale * affinity_UK, np.full((affinity_UK.shape[0], 1), self.null_logit)],
            axis=1,
        )
        # Subtract the row max so exp never overflows; it cancels in the ratio.
        logits_UK1 = logits_UK1 - logits_UK1.max(axis=1, keepdims=True)
        w_UK1 = np.exp(logits_UK1)
        return w_UK1 / w_UK1.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class MultinomialProportional:
    """Probabilities proportional to shifted affinities, with a no-click mass."""

    no_click_mass: float = 1.0
    """Unshifted score of choosing nothing."""
    min_normalizer: float = -1.0
    """Subtracted from every score (and the no-click mass) so that all are >= 0."""

    def probabilities(self, affinity_UK: np.ndarray) -> np.ndarray:
        scores_UK = affinity_UK - self.min_normalizer
        if (scores_UK < 0).any():
            raise ValueError("affinity below min_normalizer: proportional scores must be >= 0")
        null_U1 = np.full((affinity_UK.shape[0], 1), self.no_click_mass - self.min_normalizer)
        w_UK1 = np.concatenate([scores_UK, null_U1], axis=1)
        return w_UK1 / w_UK1.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Cascade:
    """Top-down scan: examine, maybe click and stop; otherwise move on with attention."""

    attention_prob: float = 0.9
    """Probability of examining the next position after not clicking the previous one."""
    score_scaling: float = 0.5
    """Converts a shifted affinity into the click probability of an examined item."""
    min_normalizer: float = -1.0
    """Subtracted from affinities before scaling, so that click probabilities are >= 0."""

    def probabilities(self, affinity_UK: np.ndarray) -> np.ndarray:
        click_UK = self.score_scaling * (affinity_UK - self.min_normalizer)
        if (click_UK < 0).any() or (click_UK > 1).any():
            raise ValueError("cascade click probability outside [0, 1]; adjust score_scaling")
        stop_UK = self.attention_prob * click_UK
        # Probability of reaching position i unclicked = product of (1 - stop) before it.
        reach_UK1 = np.concatenate(
            [np.ones((affinity_UK.shape[0], 1)), np.cumprod(1.0 - stop_UK, axis=1)], axis=1
        )
        return np.concatenate([reach_UK1[:, :-1] * stop_UK, reach_UK1[:, -1:]], axis=1)


def sample(probs_UK1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per user: the chosen position in [0, K), or -1 for no click. Shape (U,)."""
    k = probs_UK1.shape[1] - 1
    cdf_UK1 = np.cumsum(probs_UK1, axis=1)
    u_U1 = rng.random((probs_UK1.shape[0], 1)) * cdf_UK1[:, -1:]
    # Index of the first cdf entry above u; min() guards the float edge u == total.
    idx_U = np.minimum((cdf_UK1 <= u_U1).sum(axis=1), k)
    return np.where(idx_U == k, -1, idx_U).astype(np.int64)
