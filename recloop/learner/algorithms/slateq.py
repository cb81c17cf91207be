"""SlateQ (Ie et al. 2019, "SlateQ: A Tractable Decomposition for Reinforcement Learning
with Recommendation Sets", IJCAI; long version "Reinforcement Learning for Slate-based
Recommender Systems: A Tractable Decomposition and Practical Methodology").

If the user consumes at most one item and reward and transition depend only on it, the slate
value decomposes into item-wise long-term values Q̄ (paper eq. 9-10):

    Q(s, A) = Σ_{i∈A} P(i|s, A) Q̄(s, i),   P(i|s, A) = v(s,i) / (v(s,⊥) + Σ_{j∈A} v(s,j))

Q̄ is learned by TD on the consumed item only (eq. 12, SARSA-TS):

    Q̄(s, i) ← r + γ Σ_{j∈A'∪{⊥}} P(j|s', A') Q̄'(s', j)

with A' the slate actually served next and Q̄' a soft-updated target network evaluated on the
NEXT state s' (public implementations that evaluate it on s are wrong). γ = 0 is MYOP-TS
(registry name "slateq_myopic").

The null item ⊥ (``null_value``, on by default). The paper's single-choice assumption lets the
user consume one item of each slate, possibly the null item ⊥; a session goes on
after a slate without a click, so ⊥ has a long-term value Q̄(s, ⊥) too, learned by TD on the
no-click steps (reward 0), and the slate value is Σ_{i∈A} P(i) Q̄(s,i) + P(⊥) Q̄(s,⊥). Leaving
it out (``null_value=False``: ⊥ only normalises and no-click steps give no update, as RecSim's
public agent does) cuts the bootstrapped value chain at every no-click step, an effective
discount of γ·P(click) ≈ 0.6 on interest evolution whatever γ is: SARSA-TS then cannot see
past a few steps and behaves almost like MYOP-TS. With ⊥ valued, slates are selected on the
advantage over no click, Q̄(s,i) - Q̄(s,⊥), since Q(s,A) = Q̄(s,⊥) + Σ_{i∈A} P(i)(Q̄(s,i) - Q̄(s,⊥)).
With γ = 0, Q̄(s,⊥) learns 0 and nothing changes.

Choice model (``choice_model``):
- "logit": conditional logit, v = exp(score), score = a bilinear-plus-MLP function of (user
  observation, item features) and a learned null logit; fitted by maximum likelihood on every
  slate outcome (click position or no click).
- "proportional": the world's multinomial-proportional model, known rather than learned:
  v = ⟨obs, features⟩ - m and v(⊥) = mass - m (RecSim interest evolution: m = -1, mass = 1).
  Needs the observation and item features to share a dimension.

Slate selection (``selector``): "topk" by v·Q̄ (the paper's TS), "greedy", or "exact" (LP), all
in ``learner.maths``. Serving explores ε-uniformly with honest propensities.

Items over a whole catalogue (issue 13). Q̄ and v read an item only through its features and,
optionally, a learned id embedding; the paper's items are given feature vectors. Two changes
make that hold where a request names no candidates (``spec.num_candidates == 0``):
- the features are the catalogue's rows (``ItemCatalogue`` via ``learner.batch.to_batch``
  and the policy's ``item_features``), the same rows serving ranks with. Before, a slate
  item's features were looked up among the request's candidates, so with none every item
  trained and ranked on zeros: the feature weights never moved, and with ``item_id_dim`` 0
  every item had the same value;
- item identity: ``item_id_dim`` defaults to an id embedding of ``AUTO_ID_DIM`` when the world
  names no candidates (an item's own value beyond what its features say, learned from its
  clicks), none otherwise, and the logit choice model then gets a per-item bias as well. A
  world with neither features nor ids is refused: its items would be indistinguishable.
"""

from __future__ import annotations

import copy
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
from recloop.learner.maths import (
    select_slate_exact,
    select_slate_greedy,
    select_slate_topk,
    slate_value,
    soft_update,
    td_target,
)
from recloop.learner.policy import Ranking, SeededPolicy
from recloop.learner.replay import ReplayBuffer, ReplayConfig
from recloop.learner.spec import config_from_dict

EXPLORATION_STREAM = 7
"""The serving policy's random stream for SARSA-TS (``learner.policy`` lists them all)."""
AUTO_ID_DIM = 16
"""The id embedding ``item_id_dim=None`` gives a world without candidate lists."""
MYOPIC_EXPLORATION_STREAM = 19
"""MYOP-TS's own stream: the two variants are the paper's A/B pair, and arms built with the
same seed must not share exploration draws."""


@dataclass(frozen=True)
class Config(ReplayConfig):
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layers of the item-wise Q̄ network over [obs ; item features]."""
    item_id_dim: int | None = None
    """Also feed a learned id embedding of this size (0: features only; None: ``AUTO_ID_DIM``
    where the world names no candidates, else 0; see the module doc)."""
    lr: float = 1e-3
    """Adam learning rate (Q̄ and the choice model)."""
    gamma: float = 0.99
    """Discount; 0 makes this MYOP-TS. An interest-evolution session lasts about 60 steps and
    the refund of a good item only pays off as a later end of session, so the horizon
    1/(1-γ) should cover a session: 0.99 learns clearly more long-term value than 0.9."""
    tau: float = 0.01
    """Soft target update rate θ' ← τθ + (1-τ)θ' after every update."""
    choice_model: str = "logit"
    """"logit" (learned conditional logit) or "proportional" (the world's known model)."""
    proportional_min: float = -1.0
    """m of the proportional model: subtracted from every affinity and the null mass."""
    proportional_null: float = 1.0
    """Unshifted null mass of the proportional model."""
    selector: str = "topk"
    """Slate selection: "topk", "greedy" or "exact"."""
    epsilon: float = 0.1
    """Serving explores: with probability ε the whole slate is uniform."""
    null_value: bool = True
    """Learn Q̄(s, ⊥), the long-term value of a slate that gets no click (see the module doc);
    False: ⊥ only normalises the choice model and no-click steps give no Q̄ update."""


@dataclass(frozen=True)
class SlateQMetrics(Metrics):
    """One TD step on Q̄ (and, with the logit model, one likelihood step on the choice model)."""

    q_loss: float
    """Mean squared TD error over the rows that update Q̄."""
    choice_nll: float
    """-log P(outcome | s, A) of the conditional logit (0 for the known proportional model)."""
    mean_q: float
    """Mean Q̄ of the consumed item (⊥ on no-click rows) over the rows that update."""
    mean_target: float
    """Mean SARSA target over the same rows."""
    td_rows: float
    """Rows that updated Q̄."""
    updates: float
    """Updates so far, this one included."""


def item_id_dim(config: Config, spec: WorldSpec) -> int:
    """The id embedding's size: ``config.item_id_dim``, or its automatic value (module doc)."""
    if config.item_id_dim is not None:
        return config.item_id_dim
    return AUTO_ID_DIM if spec.num_candidates == 0 else 0


class ItemwiseQ(nn.Module):
    """Q̄(s, i) = MLP([user obs ; item features ; optional item id embedding]), and the null
    item's Q̄(s, ⊥) = MLP(user obs) (zero when ``null_value`` is off)."""

    def __init__(self, config: Config, spec: WorldSpec) -> None:
        super().__init__()
        id_dim = item_id_dim(config, spec)
        if id_dim == 0 and spec.item_feature_dim == 0:
            raise ValueError("SlateQ needs item features or an item id embedding "
                             "(item_id_dim > 0): without either every item has one value")
        self.ids = nets.ItemEmbedding(spec.n_items, id_dim) if id_dim else None
        in_dim = spec.user_obs_dim + spec.item_feature_dim + id_dim
        self.net = nets.mlp(max(in_dim, 1), config.hidden, 1)
        self.null = nets.mlp(max(spec.user_obs_dim, 1), config.hidden, 1) if config.null_value else None

    def null_value(self, user_obs_BU) -> torch.Tensor:
        """Q̄(s, ⊥), shape (B,)."""
        if self.null is None:
            return torch.zeros(user_obs_BU.shape[0])
        x_BU = user_obs_BU if user_obs_BU.shape[-1] else torch.ones(user_obs_BU.shape[0], 1)
        return self.null(x_BU).squeeze(-1)

    def forward(self, user_obs_BU, ids_BN, feats_BNF) -> torch.Tensor:
        B, N = ids_BN.shape
        parts = [user_obs_BU.unsqueeze(1).expand(B, N, user_obs_BU.shape[-1]), feats_BNF]
        if self.ids is not None:
            parts.append(self.ids(ids_BN))
        x_BNI = torch.cat(parts, -1)
        if x_BNI.shape[-1] == 0:
            x_BNI = torch.ones(B, N, 1)
        return self.net(x_BNI).squeeze(-1)


class ChoiceModel(nn.Module):
    """v(s, i) and v(s, ⊥): learned conditional logit or the known proportional model. The
    logit is ``obs · W · features + bias(features)``, plus a learned per-item bias where the
    agent has an id embedding (module doc)."""

    def __init__(self, config: Config, spec: WorldSpec) -> None:
        super().__init__()
        self.kind = config.choice_model
        if self.kind == "proportional" and spec.user_obs_dim != spec.item_feature_dim:
            raise ValueError("the proportional choice model needs user_obs_dim == item_feature_dim")
        if self.kind not in ("logit", "proportional"):
            raise ValueError(f"choice_model must be 'logit' or 'proportional', got {self.kind!r}")
        self.m, self.mass = config.proportional_min, config.proportional_null
        U, Fd = spec.user_obs_dim, spec.item_feature_dim
        self.bilinear = nn.Parameter(torch.zeros(U, Fd))
        self.item_bias = nets.mlp(max(Fd, 1), (16,), 1)
        self.id_bias = (nets.ItemEmbedding(spec.n_items, 1, init_std=0.0)
                        if item_id_dim(config, spec) and self.kind == "logit" else None)
        self.null_logit = nn.Parameter(torch.zeros(()))

    def forward(self, user_obs_BU, ids_BN, feats_BNF) -> tuple[torch.Tensor, torch.Tensor]:
        B = user_obs_BU.shape[0]
        if self.kind == "proportional":
            affinity_BN = (feats_BNF * user_obs_BU.unsqueeze(1)).sum(-1)
            return (affinity_BN - self.m).clamp(min=0.0), torch.full((B,), self.mass - self.m)
        return (torch.exp(self.logits(user_obs_BU, ids_BN, feats_BNF)),
                torch.exp(self.null_logit).expand(B))

    def logits(self, user_obs_BU, ids_BN, feats_BNF) -> torch.Tensor:
        x_BNF = feats_BNF if feats_BNF.shape[-1] else torch.ones(*feats_BNF.shape[:2], 1)
        inter_BN = torch.einsum("bu,uf,bnf->bn", user_obs_BU, self.bilinear, feats_BNF)
        logits_BN = inter_BN + self.item_bias(x_BNF).squeeze(-1)
        if self.id_bias is not None:
            logits_BN = logits_BN + self.id_bias(ids_BN).squeeze(-1)
        return logits_BN

    def nll(self, batch: TransitionBatch) -> torch.Tensor:
        """-log P(outcome | s, A) for the slate outcome (click position, or K for none)."""
        logits_BK = self.logits(batch.user_obs_BU, batch.slate_BK, batch.slate_features_BKF)
        logits_BK = logits_BK.masked_fill(~batch.slate_mask_BK, -1e9)
        null_B1 = self.null_logit.expand(logits_BK.shape[0], 1)
        target_B = torch.where(batch.chosen_B >= 0, batch.chosen_B,
                               torch.full_like(batch.chosen_B, logits_BK.shape[1]))
        return F.cross_entropy(torch.cat([logits_BK, null_B1], 1), target_B)


class SlateQPolicy(SeededPolicy):
    """Select the slate maximising the decomposed value; ε-uniform exploration."""

    def __init__(self, q: ItemwiseQ, choice: ChoiceModel, config: Config, spec: WorldSpec,
                 seed: int, version: int = 0) -> None:
        myopic = not config.gamma > 0  # γ = 0 is MYOP-TS
        super().__init__("slateq_myopic" if myopic else "slateq", version, seed,
                         stream=MYOPIC_EXPLORATION_STREAM if myopic else EXPLORATION_STREAM)
        self.q, self.choice, self.config, self.spec = q, choice, config, spec
        self.epsilon = config.epsilon

    def _score(self, req: RequestBatch, candidates: Candidates, k: int) -> Ranking:
        obs_1U = req.state.user_obs_BU
        # Items are ranked on their advantage over no click (see the module doc).
        q_N = (self.q(obs_1U, req.candidates_BN, req.cand_features_BNF)[0]
               - self.q.null_value(obs_1U)[0]).double().numpy()
        v_1N, v_null_1 = self.choice(obs_1U, req.candidates_BN, req.cand_features_BNF)
        v_N, v_null = v_1N[0].double().numpy(), float(v_null_1[0])
        if self.config.selector == "topk":
            top_K = select_slate_topk(v_N, q_N, k)
        elif self.config.selector == "greedy":
            top_K = select_slate_greedy(v_N, q_N, v_null, k)
        else:
            top_K = select_slate_exact(v_N, q_N, v_null, k)
        return Ranking.dense(candidates.ids, top_K, v_N * q_N)

    def item_embeddings(self) -> np.ndarray | None:
        return None if self.q.ids is None else self.q.ids.weight_ID.detach().numpy().copy()


class SlateQAgent(ReplayAgent):
    """SARSA-TS (γ > 0) or MYOP-TS (γ = 0) with a soft-updated target Q̄'."""

    def __init__(self, config: Config, spec: WorldSpec, seed: int) -> None:
        if config.selector not in ("topk", "greedy", "exact"):
            raise ValueError(f"selector must be topk, greedy or exact, got {config.selector!r}")
        super().__init__(config, spec, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.q = ItemwiseQ(config, spec)
            self.choice = ChoiceModel(config, spec)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        params = list(self.q.parameters()) + list(self.choice.parameters())
        self.opt = torch.optim.Adam(params, lr=config.lr)
        self.replay = ReplayBuffer(config.replay_capacity, seed)
        self._policy = SlateQPolicy(self.q, self.choice, config, spec, seed)

    def td_targets(self, batch: TransitionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_B, valid_B): SARSA targets on s' with the next served slate A' (and ⊥ when
        ``null_value``). Rows that are neither done nor have a known next slate cannot
        bootstrap and are not valid."""
        with torch.no_grad():
            nobs_BU = batch.next_user_obs_BU
            q_next_BK = self.q_target(nobs_BU, batch.next_slate_BK, batch.next_slate_features_BKF)
            v_BK, v_null_B = self.choice(nobs_BU, batch.next_slate_BK,
                                         batch.next_slate_features_BKF)
            mask_BK = batch.next_slate_item_mask_BK
            v_next_B = slate_value(v_BK, q_next_BK, v_null_B, mask_BK)
            if self.config.null_value:  # + P(⊥|s',A') Q̄'(s',⊥)
                p_null_B = v_null_B / (v_null_B + (v_BK * mask_BK).sum(-1))
                v_next_B = v_next_B + p_null_B * self.q_target.null_value(nobs_BU)
            # No next slate: done (nothing to bootstrap) or unknown (the row is not valid).
            v_next_B = torch.where(batch.next_slate_mask_B, v_next_B, torch.zeros_like(v_next_B))
            y_B = td_target(batch.reward_B, v_next_B, batch.done_B, self.config.gamma)
        valid_B = (batch.done_B > 0) | batch.next_slate_mask_B | (self.config.gamma == 0)
        return y_B, valid_B

    def update(self, batch: TransitionBatch) -> SlateQMetrics:
        y_B, valid_B = self.td_targets(batch)
        q_BK = self.q(batch.user_obs_BU, batch.slate_BK, batch.slate_features_BKF)
        clicked_B = batch.chosen_B >= 0
        q_B = q_BK.gather(1, batch.chosen_B.clamp(min=0).unsqueeze(1)).squeeze(1)
        if self.config.null_value:  # a no-click step updates the consumed null item
            q_B = torch.where(clicked_B, q_B, self.q.null_value(batch.user_obs_BU))
            use_B = valid_B
        else:  # ⊥ only normalises: no Q̄ update on no-click steps
            use_B = clicked_B & valid_B
        n = use_B.sum().clamp(min=1)
        q_loss = (((q_B - y_B) ** 2) * use_B).sum() / n
        loss = q_loss
        choice_loss = torch.zeros(())
        if self.config.choice_model == "logit":
            choice_loss = self.choice.nll(batch)
            loss = loss + choice_loss
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        soft_update(self.q_target, self.q, self.config.tau)
        self.updates += 1
        return SlateQMetrics(q_loss=float(q_loss.item()), choice_nll=float(choice_loss.item()),
                             mean_q=float((q_B.detach() * use_B).sum() / n),
                             mean_target=float((y_B * use_B).sum() / n),
                             td_rows=float(use_B.sum()), updates=float(self.updates))

    def _snapshot_parts(self) -> checkpoint.AgentParts:
        return checkpoint.AgentParts(
            {"q": self.q, "q_target": self.q_target, "choice": self.choice}, {"opt": self.opt},
            self.replay)


AGENT = SlateQAgent


def load_policy(tensors: dict[str, np.ndarray], manifest: dict, spec: WorldSpec) -> SlateQPolicy:
    """Inference-only policy from a snapshot (``manifest["config"]`` is ``config_dict()``)."""
    saved = dict(manifest.get("config", {}))
    if saved and "null_value" not in saved:
        saved["null_value"] = False  # written before Q̄(s, ⊥) existed: it has no null head
    config = config_from_dict(Config, saved)
    q, choice = ItemwiseQ(config, spec), ChoiceModel(config, spec)
    nets.module_from_arrays("q", q, tensors)
    nets.module_from_arrays("choice", choice, tensors)
    policy = SlateQPolicy(q, choice, config, spec, 0, version=int(manifest.get("version", 0)))
    return checkpoint.resume_policy_rng(policy, tensors)
