"""What the two DDPG-style actor-critics (``algorithms.drr``, ``algorithms.wolpertinger``)
share: the config fields of an actor, a critic and their target networks, the per-item
critic rewards of a slate, and the item feature table their catalogue search uses.

Both learn Q(s, e_a) for every *shown* item a of a slate (the consumed one earns the click's
reward, the skipped ones 0, all bootstrapping from the same s'), and both search the whole
catalogue (and DRR embeds the history) through ``features_IF``, one row per item id: the
catalogue's rows (``ReplayAgent.set_catalogue`` fills it, ``fill_features``), so the items
they search are featured exactly as their training batches (``learner.batch.to_batch``) and
serving's ``Candidates`` are. Before issue 13 the table held only the features of items seen
as candidates, and stayed zero in a world without candidate lists: the whole-catalogue search
then ranked on zeros while serving ranked on real features. The table is saved with each
snapshot (``item_features``), so a loaded policy holds the catalogue it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recloop.core.catalogue import ItemCatalogue
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


def fill_features(features_IF: torch.Tensor, catalogue: ItemCatalogue | None) -> bool:
    """Write ``catalogue``'s rows of items ``0 .. I - 1`` into ``features_IF``, in place
    (policies share the tensor; zeros for items it does not hold yet). Returns whether the
    table now holds real features: True with a catalogue, or in a world without features."""
    if catalogue is None:
        return features_IF.shape[1] == 0
    if features_IF.shape[1]:
        ids_I = np.arange(features_IF.shape[0], dtype=np.int64)
        features_IF.copy_(torch.from_numpy(catalogue.features(ids_I)))
    return True
