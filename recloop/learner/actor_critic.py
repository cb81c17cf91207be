"""What the two DDPG-style actor-critics (``algorithms.drr``, ``algorithms.wolpertinger``)
share: the config fields of an actor, a critic and their target networks, the per-item
critic rewards of a slate, and the remembered item features their catalogue search uses.

Both learn Q(s, e_a) for every *shown* item a of a slate (the consumed one earns the click's
reward, the skipped ones 0, all bootstrapping from the same s'), and both score the whole
catalogue from the features of items they have seen as candidates, since a request without
candidates carries no features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recloop.learner.batch import TransitionBatch
from recloop.learner.replay import ReplayConfig


@dataclass(frozen=True)
class ActorCriticConfig(ReplayConfig):
    """The fields an algorithm's ``Config`` shares with the other actor-critic (its own
    fields follow; field names and defaults are what snapshots' manifests hold)."""

    dim: int = 16
    """D, the dimension of item vectors and of the actor's output (DRR's ranking vector,
    Wolpertinger's proto-action)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layers of the actor and of the critic."""
    actor_lr: float = 1e-3
    """Adam learning rate of the actor."""
    critic_lr: float = 1e-3
    """Adam learning rate of the critic and of what its loss trains (DRR's state
    representation module, Wolpertinger's item vectors)."""
    gamma: float = 0.9
    """Discount γ."""
    tau: float = 0.01
    """Soft target update rate τ: θ' ← τθ + (1-τ)θ' after every update."""
    epsilon: float = 0.1
    """Serving explores: with probability ε the whole slate is uniform (honest propensities)."""
    grad_clip: float = 10.0
    """Global gradient-norm clip for each network."""


def slate_rewards(batch: TransitionBatch) -> torch.Tensor:
    """r_BK: the click's reward for the consumed slate item, 0 for the skipped ones."""
    K = batch.slate_BK.shape[1]
    hit_BK = torch.arange(K).unsqueeze(0) == batch.chosen_B.unsqueeze(1)
    return torch.where(hit_BK, batch.reward_B.unsqueeze(1), torch.zeros(()))


def remember_features(features_IF: torch.Tensor, ids_BN: torch.Tensor,
                      feats_BNF: torch.Tensor) -> None:
    """Write the features of the real items in ``ids_BN`` (-1 is padding) into the
    catalogue table ``features_IF``, in place (a world without features has nothing to
    remember)."""
    if features_IF.shape[1] and ids_BN.numel():
        real = ids_BN >= 0
        features_IF[ids_BN[real]] = feats_BNF[real]
