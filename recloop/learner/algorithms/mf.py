"""Matrix factorisation on implicit feedback, learned online with BPR: the myopic baseline.

Score r̂(s, i) = p(s)·q_i + b_i, ranked top-K. Learned with Bayesian Personalised Ranking
(Rendle et al. 2009): for each answered slate, the clicked item should outscore every item
that was impressed but skipped,

    L = -Σ_{(i, j)} log σ(r̂(s, i) - r̂(s, j)),   i clicked, j skipped in the same slate,

since impressions give natural negatives. No discount, no future: the myopic baseline every
RL method must beat.

Deviations, both deliberate:
- the user factor p(s) is a function of what the user lets us see (observation and recent
  positive items, ``nets.StateEncoder``) rather than a free vector per user id: simulated
  users are new every session, so a per-id factor would never be trained twice;
- a "null item" with score n(s) (a linear head on p(s)) takes part in the pairs: a click must
  also beat the null, and a slate with no click says the null beat every shown item. This is
  pairwise conditional logit; it gives no-click slates something to teach (``null_pairs``).

The item factor q_i is an id embedding plus a linear map of the item's features, so the same
code serves id-only and feature-only worlds; ``item_embeddings`` exposes the id part. The id
embedding is what gives items their identity over a whole catalogue (no candidate list).

Item features (issue 13) are the catalogue's rows (``ItemCatalogue``, through
``learner.batch.to_batch`` and the policy's ``item_features``), the same rows serving ranks
with. Before, a slate item's features came from the request's candidate list, so with none
they were zeros: the feature map got no data gradient and moved only by weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recloop.core.ports import Candidates
from recloop.core.spec import WorldSpec
from recloop.learner import checkpoint, nets
from recloop.learner.agent import ReplayAgent
from recloop.learner.batch import RequestBatch, TransitionBatch
from recloop.learner.contract import Metrics
from recloop.learner.policy import Ranking, SeededPolicy
from recloop.learner.replay import ReplayBuffer, ReplayConfig
from recloop.learner.spec import config_from_dict

EXPLORATION_STREAM = 5
"""The serving policy's random stream (``learner.policy`` lists every algorithm's)."""


@dataclass(frozen=True)
class Config(ReplayConfig):
    dim: int = 16
    """Factor dimension D."""
    hidden: tuple[int, ...] = (32,)
    """Hidden layers of the user tower p(s)."""
    history_mode: str = "mean"
    """How the user tower pools recent positive items: "mean" or "gru"."""
    lr: float = 1e-2
    """Adam learning rate."""
    weight_decay: float = 1e-5
    """L2 regularisation (BPR's λ), applied through Adam."""
    # ReplayConfig's schedule, with MF's own defaults:
    replay_capacity: int = 20_000
    """Transitions kept for replay (online MF revisits recent data a few times)."""
    update_every: int = 4
    learning_starts: int = 32
    null_pairs: bool = True
    """Include the null item in the pairs (see the module docstring)."""
    epsilon: float = 0.1
    """Serving explores: with probability ε the whole slate is uniform (honest propensities)."""


@dataclass(frozen=True)
class MFMetrics(Metrics):
    """One BPR update."""

    bpr_loss: float
    """-mean log σ(winner - loser) over the batch's pairs (0 when it has none)."""
    pair_accuracy: float
    """Share of pairs the model already orders right, before the step."""
    pairs: float
    """Number of (winner, loser) pairs in the batch."""
    updates: float
    """Updates so far, this one included."""


class MFNet(nn.Module):
    """User tower p(s), item factors q_i (+ bias b_i) and the null head n(s)."""

    def __init__(self, config: Config, spec: WorldSpec) -> None:
        super().__init__()
        items = nets.ItemEmbedding(spec.n_items, config.dim)
        self.user = nets.StateEncoder(
            spec.user_obs_dim, nets.HistoryEncoder(items, config.history_mode), config.dim,
            config.hidden)
        self.item = nets.ItemTower(spec.n_items, spec.item_feature_dim, config.dim)
        self.item_bias = nets.ItemEmbedding(spec.n_items, 1, init_std=0.0)
        self.null = nn.Linear(config.dim, 1)

    def scores(self, state, ids_BN: torch.Tensor, feats_BNF: torch.Tensor):
        """(item scores (B, N), null score (B,)) for a ``StateBatch``."""
        p_BD = self.user.encode(state)
        q_BND = self.item(ids_BN, feats_BNF)
        scores_BN = (q_BND * p_BD.unsqueeze(1)).sum(-1) + self.item_bias(ids_BN).squeeze(-1)
        return scores_BN, self.null(p_BD).squeeze(-1)


def bpr_loss(pos_B: torch.Tensor, neg_B: torch.Tensor) -> torch.Tensor:
    """-mean log σ(pos - neg) over pairs."""
    return -F.logsigmoid(pos_B - neg_B).mean()


def slate_pairs(batch: TransitionBatch, scores_BK: torch.Tensor, null_B: torch.Tensor,
                null_pairs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(winner, loser) scores of every BPR pair in the batch."""
    B, K = scores_BK.shape
    clicked_B = batch.chosen_B >= 0
    pos_B = scores_BK.gather(1, batch.chosen_B.clamp(min=0).unsqueeze(1)).squeeze(1)
    skipped_BK = batch.slate_mask_BK & (torch.arange(K) != batch.chosen_B.unsqueeze(1))
    pair_BK = skipped_BK & clicked_B.unsqueeze(1)
    winners = [pos_B.unsqueeze(1).expand(B, K)[pair_BK]]
    losers = [scores_BK[pair_BK]]
    if null_pairs:
        winners += [pos_B[clicked_B], null_B.unsqueeze(1).expand(B, K)[
            ~clicked_B.unsqueeze(1) & batch.slate_mask_BK]]
        losers += [null_B[clicked_B], scores_BK[~clicked_B.unsqueeze(1) & batch.slate_mask_BK]]
    return torch.cat(winners), torch.cat(losers)


class MFPolicy(SeededPolicy):
    """Top-K by p(s)·q_i + b_i, with ε-uniform exploration while ``explore`` is on."""

    def __init__(self, net: MFNet, config: Config, spec: WorldSpec, seed: int,
                 version: int = 0) -> None:
        super().__init__("mf", version, seed, stream=EXPLORATION_STREAM)
        self.net, self.config, self.spec, self.epsilon = net, config, spec, config.epsilon

    def _score(self, req: RequestBatch, candidates: Candidates, k: int) -> Ranking:
        scores_N = self.net.scores(req.state, req.candidates_BN, req.cand_features_BNF)[0][0]
        return Ranking.dense(candidates.ids, torch.topk(scores_N, k).indices.numpy(),
                             scores_N.numpy())

    def item_embeddings(self) -> np.ndarray | None:
        ids = self.net.item.ids
        return None if ids is None else ids.weight_ID.detach().numpy().copy()


class MFAgent(ReplayAgent):
    """Online BPR: pushes transitions into replay and updates every ``update_every``."""

    def __init__(self, config: Config, spec: WorldSpec, seed: int) -> None:
        super().__init__(config, spec, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = MFNet(config, spec)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr,
                                    weight_decay=config.weight_decay)
        self.replay = ReplayBuffer(config.replay_capacity, seed)
        self._policy = MFPolicy(self.net, config, spec, seed)

    def update(self, batch: TransitionBatch) -> MFMetrics:
        scores_BK, null_B = self.net.scores(batch.state, batch.slate_BK, batch.slate_features_BKF)
        win, lose = slate_pairs(batch, scores_BK, null_B, self.config.null_pairs)
        loss = bpr_loss(win, lose) if win.numel() else scores_BK.sum() * 0.0
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.updates += 1
        with torch.no_grad():
            accuracy = (win > lose).float().mean().item() if win.numel() else 0.0
        return MFMetrics(bpr_loss=float(loss.item()), pair_accuracy=accuracy,
                         pairs=float(win.numel()), updates=float(self.updates))

    def _snapshot_parts(self) -> checkpoint.AgentParts:
        return checkpoint.AgentParts({"net": self.net}, {"opt": self.opt}, self.replay)


AGENT = MFAgent


def load_policy(tensors: dict[str, np.ndarray], manifest: dict, spec: WorldSpec) -> MFPolicy:
    """Inference-only policy from a snapshot (``manifest["config"]`` is ``config_dict()``)."""
    config = config_from_dict(Config, manifest.get("config", {}))
    net = MFNet(config, spec)
    nets.module_from_arrays("net", net, tensors)
    return checkpoint.resume_policy_rng(
        MFPolicy(net, config, spec, 0, version=int(manifest.get("version", 0))), tensors)
