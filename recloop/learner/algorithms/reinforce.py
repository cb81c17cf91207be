"""REINFORCE with off-policy and top-K correction (Chen et al. 2019, "Top-K Off-Policy
Correction for a REINFORCE Recommender System", WSDM).

Policy: π(a|s) = softmax_a(s·v_a / T) over the request's candidates (or the whole catalogue),
with s from a GRU (or mean) over recent positive items plus the user's observation.

Gradient (paper eq. 6 with §4.3's capping), for logged (s_t, a_t) with return R_t:

    ∇J ≈ Σ_t min(π(a_t|s_t) / β(a_t|s_t), c) · λ_K(s_t, a_t) · R_t · ∇ log π(a_t|s_t),
    λ_K = K (1 - π(a_t|s_t))^(K-1)                         (``maths.topk_lambda``)

π and β are both evaluated at the logged action; weights are constants (no gradient).

- β (``behaviour``): "learned" is the paper's second softmax head on ``state.detach()``
  (its own item vectors), fitted by maximum likelihood on every logged slate item; "logged"
  uses the serving propensity. Deviation: served propensities are *inclusion* probabilities
  of a K-item slate, so "logged" uses β ≈ propensity / K (exact for K independent draws of a
  small-probability item).
- π learns from rewarded actions only (the clicked item), with R_t = r_t + γ R_{t+1} over the
  session. Transitions are therefore held per session until it ends (``done``), then their
  returns are computed and they enter replay.
- Sampled softmax (``sampled_softmax`` negatives) replaces the full softmax when requests name
  no candidates, i.e. the whole catalogue is the action space; negatives are uniform, so the
  log-Q correction is a constant and cancels.
- Serving explores (§5 of the paper): the top K' items of π deterministically (propensity 1)
  and the other K - K' sampled from the rest in proportion to π, by systematic sampling, whose
  inclusion probabilities are exactly the logged propensities (``maths.systematic_sample``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recloop.core.events import Transition
from recloop.core.ports import Candidates
from recloop.core.spec import WorldSpec
from recloop.learner import checkpoint, nets
from recloop.learner.agent import ReplayAgent
from recloop.learner.batch import RequestBatch, TransitionBatch, to_batch
from recloop.learner.contract import Metrics
from recloop.learner.maths import (
    capped_importance_weight,
    discounted_returns,
    pps_inclusion_probs,
    systematic_sample,
    topk_lambda,
)
from recloop.learner.policy import Ranking, SeededPolicy
from recloop.learner.replay import (
    ReplayBuffer,
    ReplayConfig,
    items_from_arrays,
    items_to_arrays,
)
from recloop.learner.spec import config_from_dict

SESSIONS = "sessions"  # snapshot key prefix of the transitions held until their session ends
EXPLORATION_STREAM = 17
"""The serving policy's random stream (``learner.policy`` lists every algorithm's)."""


@dataclass(frozen=True)
class Config(ReplayConfig):
    dim: int = 16
    """State and item vector dimension D."""
    hidden: tuple[int, ...] = (32,)
    """Hidden layers of the state encoder."""
    history_mode: str = "gru"
    """History encoder: "gru" (the paper's recurrent state) or "mean"."""
    temperature: float = 1.0
    """Softmax temperature T."""
    lr: float = 3e-3
    """Adam learning rate (π, β and the encoders together)."""
    gamma: float = 0.9
    """Discount of the return R_t."""
    topk_correction: bool = True
    """Multiply by λ_K (False: the standard off-policy correction only)."""
    off_policy_correction: bool = True
    """Use the π/β weight (False: plain on-policy REINFORCE on logged data)."""
    behaviour: str = "learned"
    """Where β comes from: "learned" (head on the detached state) or "logged"."""
    weight_cap: float = float(np.e**3)
    """c in min(π/β, c); the paper's production value e^3."""
    sampled_softmax: int = 256
    """Negatives drawn when the action space is the whole catalogue."""
    # ReplayConfig's schedule, with REINFORCE's own defaults:
    replay_capacity: int = 20_000
    """Transitions (with their returns) kept for replay."""
    update_every: int = 4
    """One update per this many transitions entering replay."""
    learning_starts: int = 32
    max_open_sessions: int = 10_000
    """Sessions held waiting for their end; beyond it the oldest is released with the
    return truncated at its last known step (a session that never ends must not leak)."""
    explore_topk: int = -1
    """K': items served deterministically; the rest are sampled from π. -1 means K - 1."""


@dataclass(frozen=True)
class ReinforceMetrics(Metrics):
    """One policy-gradient step on π and one likelihood step on the learned β."""

    pg_loss: float
    """-mean w · R · log π(a|s) over the rewarded rows."""
    beta_nll: float
    """-mean log β of every logged slate item found in the action set."""
    mean_weight: float
    """Mean correction weight min(π/β, c) · λ_K over the rewarded rows."""
    mean_pi: float
    """Mean π(a|s) of the rewarded actions."""
    rewarded: float
    """Rows with a clicked action in the action set (the rows π learns from)."""
    updates: float
    """Updates so far, this one included."""


class ReinforceNet(nn.Module):
    """State encoder, π item vectors v_a, and the behaviour head (W_β, u_a)."""

    def __init__(self, config: Config, spec: WorldSpec) -> None:
        super().__init__()
        items = nets.ItemEmbedding(spec.n_items, config.dim)
        self.state = nets.StateEncoder(spec.user_obs_dim,
                                       nets.HistoryEncoder(items, config.history_mode),
                                       config.dim, config.hidden)
        self.item = nets.ItemTower(spec.n_items, spec.item_feature_dim, config.dim)
        self.beta_state = nn.Linear(config.dim, config.dim)
        self.beta_item = nets.ItemTower(spec.n_items, spec.item_feature_dim, config.dim)
        self.temperature = config.temperature

    def logits(self, s_BD, ids_BN, feats_BNF, beta: bool = False) -> torch.Tensor:
        if beta:  # the behaviour head never moves the shared state (paper: state.detach())
            s_BD, v_BND = self.beta_state(s_BD.detach()), self.beta_item(ids_BN, feats_BNF)
        else:
            v_BND = self.item(ids_BN, feats_BNF)
        return (v_BND * s_BD.unsqueeze(1)).sum(-1) / self.temperature


def pg_weights(pi_B: torch.Tensor, beta_B: torch.Tensor, k: int, cap: float,
               off_policy: bool = True, topk: bool = True) -> torch.Tensor:
    """The per-sample multiplier of R_t ∇log π: min(π/β, c) · λ_K (both optional), detached."""
    w_B = torch.ones_like(pi_B)
    if off_policy:
        w_B = w_B * capped_importance_weight(pi_B, beta_B, cap)
    if topk:
        w_B = w_B * topk_lambda(pi_B, k)
    return w_B.detach()


class ReinforcePolicy(SeededPolicy):
    """Softmax over candidates; serves top K' plus K - K' sampled (while ``explore``)."""

    def __init__(self, net: ReinforceNet, config: Config, spec: WorldSpec, seed: int,
                 version: int = 0) -> None:
        super().__init__("reinforce", version, seed, stream=EXPLORATION_STREAM)
        self.net, self.config, self.spec = net, config, spec

    def _score(self, req: RequestBatch, candidates: Candidates, k: int) -> Ranking:
        s_1D = self.net.state.encode(req.state)
        pi_N = torch.softmax(self.net.logits(s_1D, req.candidates_BN, req.cand_features_BNF)[0],
                             -1).double().numpy()
        return Ranking.dense(candidates.ids, np.argsort(-pi_N, kind="stable"), pi_N)

    def _pull(self, ranking: Ranking, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top K' of π, then K - K' of the rest by systematic sampling ∝ π (all K top
        items while ``explore`` is off)."""
        k_det = k if not self.explore else (k - 1 if self.config.explore_topk < 0
                                            else min(self.config.explore_topk, k))
        top, rest = ranking.order[:k_det], ranking.order[k_det:]
        incl_R = pps_inclusion_probs(ranking.score_of(rest), k - k_det)
        picked = systematic_sample(incl_R, self.rng) if k > k_det else np.zeros(0, np.int64)
        idx_K = np.concatenate([top, rest[picked]]).astype(np.int64)
        prop_K = np.concatenate([np.ones(k_det), incl_R[picked]])
        return idx_K, np.clip(prop_K, 0.0, 1.0)

    def item_embeddings(self) -> np.ndarray | None:
        ids = self.net.item.ids
        return None if ids is None else ids.weight_ID.detach().numpy().copy()


class ReinforceAgent(ReplayAgent):
    """Holds each session until it ends, computes returns, replays, updates."""

    def __init__(self, config: Config, spec: WorldSpec, seed: int) -> None:
        if config.behaviour not in ("learned", "logged"):
            raise ValueError(f"behaviour must be 'learned' or 'logged', got {config.behaviour!r}")
        super().__init__(config, spec, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = ReinforceNet(config, spec)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.gen = torch.Generator().manual_seed(seed)  # sampled-softmax negatives
        self.replay = ReplayBuffer(config.replay_capacity, seed)
        self._sessions: dict[tuple[str, str], list[Transition]] = {}
        self._policy = ReinforcePolicy(self.net, config, spec, seed)

    def _action_logits(self, batch: TransitionBatch, s_BD, beta: bool):
        """Logits over the action set and the index of each slate item in it."""
        if batch.candidates_BN.shape[1] > 0:
            logits_BN = self.net.logits(s_BD, batch.candidates_BN, batch.cand_features_BNF, beta)
            logits_BN = logits_BN.masked_fill(~batch.candidates_mask_BN, -1e9)
            return logits_BN, batch.slate_cand_idx_BK
        # Whole catalogue: sampled softmax over [slate items ; uniform negatives].
        B, K = batch.slate_BK.shape
        neg_BM = torch.randint(0, self.spec.n_items, (B, self.config.sampled_softmax),
                               generator=self.gen)
        ids_BN = torch.cat([batch.slate_BK, neg_BM], 1)
        feats_BNF = torch.zeros(B, ids_BN.shape[1], self.spec.item_feature_dim)
        logits_BN = self.net.logits(s_BD, ids_BN, feats_BNF, beta)
        logits_BN = logits_BN.masked_fill(ids_BN < 0, -1e9)
        return logits_BN, torch.arange(K).expand(B, K).masked_fill(batch.slate_BK < 0, -1)

    def update(self, batch: TransitionBatch,
               return_B: torch.Tensor | None = None) -> ReinforceMetrics:
        """One step; ``return_B`` defaults to the immediate reward (a one-step return)."""
        c = self.config
        R_B = batch.reward_B if return_B is None else return_B
        s_BD = self.net.state.encode(batch.state)
        logits_BN, idx_BK = self._action_logits(batch, s_BD, beta=False)
        logp_BN = torch.log_softmax(logits_BN, -1)
        beta_logp_BN = torch.log_softmax(self._action_logits(batch, s_BD, beta=True)[0], -1)
        # β: maximum likelihood on every logged slate item found in the action set.
        logged_BK = idx_BK >= 0
        beta_ll_BK = beta_logp_BN.gather(1, idx_BK.clamp(min=0))
        beta_loss = -(beta_ll_BK * logged_BK).sum() / logged_BK.sum().clamp(min=1)
        # π: rewarded (clicked) actions only.
        pos_B = batch.chosen_B.clamp(min=0)
        act_B = idx_BK.gather(1, pos_B.unsqueeze(1)).squeeze(1)
        use_B = (batch.chosen_B >= 0) & (act_B >= 0)
        logp_B = logp_BN.gather(1, act_B.clamp(min=0).unsqueeze(1)).squeeze(1)
        pi_B = logp_B.detach().exp()
        if c.behaviour == "learned":
            beta_B = beta_logp_BN.gather(1, act_B.clamp(min=0).unsqueeze(1)).squeeze(1).exp()
        else:
            beta_B = batch.propensities_BK.gather(1, pos_B.unsqueeze(1)).squeeze(1) / self.spec.slate_size
        w_B = pg_weights(pi_B, beta_B.detach(), self.spec.slate_size, c.weight_cap,
                         c.off_policy_correction, c.topk_correction)
        pg_loss = -(w_B * R_B * logp_B * use_B).sum() / use_B.sum().clamp(min=1)
        loss = pg_loss + beta_loss
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.updates += 1
        n_used = use_B.sum().clamp(min=1)
        return ReinforceMetrics(pg_loss=float(pg_loss.item()), beta_nll=float(beta_loss.item()),
                                mean_weight=float((w_B * use_B).sum() / n_used),
                                mean_pi=float((pi_B * use_B).sum() / n_used),
                                rewarded=float(use_B.sum()), updates=float(self.updates))

    def _entering(self, transitions: Sequence[Transition]) -> list[tuple[Transition, float]]:
        """Finished sessions' transitions with their returns: REINFORCE learns from those."""
        finished: list[tuple[Transition, float]] = []
        for t in transitions:
            key = (t.user_id, t.session_id)
            self._sessions.setdefault(key, []).append(t)
            if t.done:
                finished += self._with_returns(self._sessions.pop(key))
        while len(self._sessions) > self.config.max_open_sessions:
            finished += self._with_returns(self._sessions.pop(next(iter(self._sessions))))
        return finished

    def _update_on(self, sample: list[tuple[Transition, float]]) -> ReinforceMetrics:
        batch = to_batch([t for t, _ in sample], self.spec)
        return self.update(batch, torch.tensor([r for _, r in sample], dtype=torch.float32))

    def _with_returns(self, episode: list[Transition]) -> list[tuple[Transition, float]]:
        R_T = discounted_returns(np.array([e.reward for e in episode]),
                                 np.array([e.done for e in episode]), self.config.gamma)
        return list(zip(episode, R_T.tolist(), strict=True))

    def _snapshot_parts(self) -> checkpoint.AgentParts:
        return checkpoint.AgentParts({"net": self.net}, {"opt": self.opt}, self.replay)

    def _snapshot_extra(self) -> dict[str, np.ndarray]:
        return {"gen": nets.generator_to_array(self.gen), **self._sessions_arrays()}

    def _sessions_arrays(self) -> dict[str, np.ndarray]:
        """Sessions still waiting for their end (only with ``snapshot_replay``)."""
        if not self.config.snapshot_replay:
            return {}
        held = [t for episode in self._sessions.values() for t in episode]
        return checkpoint.with_prefix(SESSIONS, items_to_arrays(held))

    def _load_extra(self, tensors: dict[str, np.ndarray]) -> None:
        nets.generator_from_array(self.gen, tensors["gen"])
        if f"{SESSIONS}.items_blob" in tensors:
            self._sessions = {}
            for t in items_from_arrays(checkpoint.under_prefix(SESSIONS, tensors)):
                self._sessions.setdefault((t.user_id, t.session_id), []).append(t)


AGENT = ReinforceAgent


def load_policy(tensors: dict[str, np.ndarray], manifest: dict, spec: WorldSpec):
    """Inference-only policy from a snapshot (``manifest["config"]`` is ``config_dict()``)."""
    config = config_from_dict(Config, manifest.get("config", {}))
    net = ReinforceNet(config, spec)
    nets.module_from_arrays("net", net, tensors)
    policy = ReinforcePolicy(net, config, spec, 0, version=int(manifest.get("version", 0)))
    return checkpoint.resume_policy_rng(policy, tensors)
