"""REINFORCE with off-policy and top-K correction (Chen et al. 2019, "Top-K Off-Policy
Correction for a REINFORCE Recommender System", WSDM).

Policy: π(a|s) = softmax_a(s·v_a / T) over the request's candidates (or the whole catalogue),
with s from a GRU (or mean) over recent positive items plus the user's observation, and v_a
from the item's id embedding plus a linear map of its catalogue features.

Gradient (paper eq. 6 with §4.3's capping), for logged (s_t, a_t) with return R_t:

    ∇J ≈ Σ_t min(π(a_t|s_t) / β(a_t|s_t), c) · λ_K(s_t, a_t) · R_t · ∇ log π(a_t|s_t),
    λ_K = K (1 - π(a_t|s_t))^(K-1)                         (``maths.topk_lambda``)

π and β are both evaluated at the logged action; weights are constants (no gradient). K is
``Config.topk_k`` (the slate size unless set: the paper's K is the number of draws from π, which
need not be the served slate's length).

The action set, and so the normaliser of π and β, depends on the request:

- **Candidates** (the request names N items): a softmax over them, log π = l_a - logsumexp_N l.
- **Exact catalogue** (no candidates, n_items ≤ ``exact_max_items``): a softmax over every
  item of the catalogue, log π(a) = l_a - log Z, Z = Σ_j exp(l_j). ``catalogue_log_normaliser``
  computes log Z in chunks of ``exact_chunk`` items and recomputes them in the backward pass, so
  memory is O(B · chunk + N · D), never B × N; autograd over the logits is the whole gradient.
- **Sampled catalogue** (larger catalogues): M = ``sampled_softmax`` negatives j_1..j_M drawn
  i.i.d. from the proposal Q (uniform, Q_j = 1/N), SHARED by π and β and by every row of the
  batch, with the log-Q correction and accidental hits removed:

      Ẑ = Σ_{a∈A} exp(l_a) + Σ_m 1[j_m ∉ A] exp(l_{j_m} - log(M Q_{j_m}))

  where A is the row's logged slate (the targets of β's likelihood, and π's clicked item among
  them). The slate's items are counted exactly; the second sum is an unbiased importance
  estimate of Σ_{j∉A} exp(l_j), so Ẑ is unbiased for Z and π̂ = exp(l_a)/Ẑ is a properly
  normalised probability (consistent as M grows), which the π/β weight and λ_K need. With a
  uniform Q the correction -log(M/N) is a constant, but it does not cancel: the slate's terms
  carry none (``sampled_log_normaliser``).

- β (``behaviour``): "learned" is the paper's second softmax head on ``state.detach()``
  (its own item vectors), fitted by maximum likelihood on every logged slate item, normalised
  over the same action set as π; "logged" uses the serving propensity. Deviation: served
  propensities are *inclusion* probabilities of a K-item slate, so "logged" uses
  β ≈ propensity / slate size (exact for K independent draws of a small-probability item).
- π learns from rewarded actions only (the clicked item), with R_t = r_t + γ R_{t+1} over the
  session. Transitions are therefore held per session until it ends (``done``), then their
  returns are computed and they enter replay.
- Item features come from the agent's catalogue (``ReplayAgent.catalogue``): in a batch for
  candidate rows (``learner.batch.to_batch``), here for the whole catalogue and the negatives.
  A world with item features refuses to learn over the catalogue without one (no zero rows).
- Deviations: the paper's sampled softmax draws negatives from an item-frequency proposal; here
  Q is uniform (the correction handles any Q, only the sampler is uniform). A batch mixes modes
  only as "candidates": a row without candidates in such a batch has no action and is skipped.
- Serving explores (§5 of the paper): the top K' items of π deterministically (propensity 1)
  and the other K - K' sampled from the rest in proportion to π, by systematic sampling, whose
  inclusion probabilities are exactly the logged propensities (``maths.systematic_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Transition
from recloop.core.ports import Candidates
from recloop.core.spec import WorldSpec
from recloop.learner import checkpoint, nets
from recloop.learner.agent import NoCatalogueError, ReplayAgent
from recloop.learner.batch import RequestBatch, TransitionBatch
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
    topk_k: int = 0
    """K of λ_K, the number of draws from π a slate stands for; 0 means the slate size."""
    off_policy_correction: bool = True
    """Use the π/β weight (False: plain on-policy REINFORCE on logged data)."""
    behaviour: str = "learned"
    """Where β comes from: "learned" (head on the detached state) or "logged"."""
    weight_cap: float = float(np.e**3)
    """c in min(π/β, c); the paper's production value e^3."""
    exact_max_items: int = 200_000
    """Largest catalogue whose softmax is computed exactly when a request names no candidates;
    above it π and β use the sampled softmax."""
    exact_chunk: int = 32_768
    """Items per chunk of the exact normaliser (bounds its memory to B × chunk logits)."""
    sampled_softmax: int = 256
    """M, the negatives drawn per update (shared by π, β and the batch's rows) when the
    catalogue is over ``exact_max_items``."""
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

    def head(self, s_BD: torch.Tensor, beta: bool = False) -> tuple[torch.Tensor, nets.ItemTower]:
        """The query q = s / T (β: W_β s.detach() / T) and the item tower its logits use."""
        if beta:  # the behaviour head never moves the shared state (paper: state.detach())
            return self.beta_state(s_BD.detach()) / self.temperature, self.beta_item
        return s_BD / self.temperature, self.item

    def logits(self, s_BD, ids_BN, feats_BNF, beta: bool = False) -> torch.Tensor:
        q_BD, tower = self.head(s_BD, beta)
        return (tower(ids_BN, feats_BNF) * q_BD.unsqueeze(1)).sum(-1)


@dataclass(frozen=True)
class ActionSet:
    """What π and β are normalised over in one update (the module docstring's three modes):
    ``mode`` "candidates" (the batch's own), "exact" (``ids`` every item) or "sampled"
    (``ids`` the M shared negatives, ``log_q`` their proposal log-probabilities)."""

    mode: str
    ids: torch.Tensor
    features: torch.Tensor
    log_q: torch.Tensor


def pg_weights(pi_B: torch.Tensor, beta_B: torch.Tensor, k: int, cap: float,
               off_policy: bool = True, topk: bool = True) -> torch.Tensor:
    """The per-sample multiplier of R_t ∇log π: min(π/β, c) · λ_K (both optional), detached."""
    w_B = torch.ones_like(pi_B)
    if off_policy:
        w_B = w_B * capped_importance_weight(pi_B, beta_B, cap)
    if topk:
        w_B = w_B * topk_lambda(pi_B, k)
    return w_B.detach()


class _ChunkedLogSumExp(torch.autograd.Function):
    """log Σ_n exp(s_b · v_n) over item chunks; the backward pass recomputes each chunk's
    softmax instead of keeping a B × N matrix."""

    @staticmethod
    def forward(ctx, s_BD, v_ND, chunk):  # type: ignore[override]
        logz_B = s_BD.new_full((s_BD.shape[0],), -float("inf"))
        for lo in range(0, v_ND.shape[0], chunk):
            logz_B = torch.logaddexp(logz_B, (s_BD @ v_ND[lo:lo + chunk].T).logsumexp(-1))
        ctx.save_for_backward(s_BD, v_ND, logz_B)
        ctx.chunk = chunk
        return logz_B

    @staticmethod
    def backward(ctx, g_B):  # type: ignore[override]
        s_BD, v_ND, logz_B = ctx.saved_tensors
        g_s_BD, g_v_ND = torch.zeros_like(s_BD), torch.empty_like(v_ND)
        for lo in range(0, v_ND.shape[0], ctx.chunk):
            v_CD = v_ND[lo:lo + ctx.chunk]
            gp_BC = torch.exp(s_BD @ v_CD.T - logz_B[:, None]) * g_B[:, None]
            g_s_BD += gp_BC @ v_CD
            g_v_ND[lo:lo + ctx.chunk] = gp_BC.T @ s_BD
        return g_s_BD, g_v_ND, None


def catalogue_log_normaliser(s_BD: torch.Tensor, v_ND: torch.Tensor,
                             chunk: int = 32_768) -> torch.Tensor:
    """log Z_b = log Σ_n exp(s_b · v_n) over every item, exactly, in chunks of ``chunk`` items
    (differentiable in both arguments; memory O(B · chunk) beyond the inputs)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedLogSumExp.apply(s_BD, v_ND, chunk)


def sampled_log_normaliser(slate_logits_BK: torch.Tensor, slate_BK: torch.Tensor,
                           neg_logits_BM: torch.Tensor, neg_M: torch.Tensor,
                           log_q_M: torch.Tensor) -> torch.Tensor:
    """log Ẑ_b = log[Σ_{a∈A_b} exp(l_a) + Σ_m 1[j_m ∉ A_b] exp(l_{j_m} - log(M Q_{j_m}))].

    ``slate_BK`` are the row's targets A_b (-1 padding; a repeated id counts once), ``neg_M``
    the M shared draws j_m from Q with ``log_q_M`` = log Q_{j_m}; a draw equal to one of the
    row's targets (an accidental hit) is removed, the targets being counted exactly. Unbiased
    for Z = Σ_j exp(l_j) (module docstring)."""
    K, M = slate_BK.shape[1], neg_M.shape[0]
    earlier_BKK = (slate_BK[:, :, None] == slate_BK[:, None, :]).tril(-1)
    keep_BK = (slate_BK >= 0) & ~earlier_BKK.any(-1)
    hit_BM = (neg_M[None, None, :] == slate_BK[:, :, None]).any(1) if K else \
        torch.zeros(neg_logits_BM.shape, dtype=torch.bool)
    corrected_BM = neg_logits_BM - (math.log(M) + log_q_M)[None, :]
    terms_BN = torch.cat([slate_logits_BK.masked_fill(~keep_BK, -1e9),
                          corrected_BM.masked_fill(hit_BM, -1e9)], 1)
    return terms_BN.logsumexp(-1)


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
        if config.topk_k < 0 or config.exact_chunk < 1 or config.sampled_softmax < 1:
            raise ValueError("topk_k must be >= 0 (0: the slate size), exact_chunk and "
                             f"sampled_softmax >= 1, got {config}")
        super().__init__(config, spec, seed)
        self._rows: tuple[ItemCatalogue | None, torch.Tensor] | None = None  # exact-mode rows
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = ReinforceNet(config, spec)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.gen = torch.Generator().manual_seed(seed)  # sampled-softmax negatives
        self.replay = ReplayBuffer(config.replay_capacity, seed)
        self._sessions: dict[tuple[str, str], list[Transition]] = {}
        self._policy = ReinforcePolicy(self.net, config, spec, seed)

    @property
    def topk_k(self) -> int:
        """K of λ_K (``Config.topk_k``, the slate size when 0)."""
        return self.config.topk_k or self.spec.slate_size

    def _features(self, ids: torch.Tensor) -> torch.Tensor:
        """The catalogue's feature rows of ``ids``: ``ids.shape + (F,)``."""
        if not self.spec.item_feature_dim:
            return torch.empty(*ids.shape, 0)
        if self.catalogue is None:
            raise NoCatalogueError(
                f"{self.name}: learning over the whole catalogue needs its "
                f"{self.spec.item_feature_dim} item features (set_catalogue)")
        return torch.from_numpy(self.catalogue.features(ids.numpy()))

    def action_set(self, batch: TransitionBatch) -> ActionSet:
        """The batch's candidates, or the whole catalogue (exact up to ``exact_max_items``,
        else M uniform negatives drawn once for π and β)."""
        none = torch.empty(0)
        if batch.candidates_BN.shape[1] > 0:
            return ActionSet("candidates", none.long(), none, none)
        n = self.spec.n_items
        if n <= self.config.exact_max_items:
            if self._rows is None or self._rows[0] is not self.catalogue:
                self._rows = (self.catalogue, self._features(torch.arange(n)))
            return ActionSet("exact", torch.arange(n), self._rows[1], none)
        m = self.config.sampled_softmax
        neg_M = torch.randint(0, n, (m,), generator=self.gen)
        return ActionSet("sampled", neg_M, self._features(neg_M), torch.full((m,), -np.log(n)))

    def slate_log_probs(self, batch: TransitionBatch, actions: ActionSet, s_BD: torch.Tensor,
                        beta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """log π (or log β) of every slate item, normalised over ``actions``, and whether the
        item is in the action set (``found_BK``)."""
        if actions.mode == "candidates":
            logits_BN = self.net.logits(s_BD, batch.candidates_BN, batch.cand_features_BNF, beta)
            logp_BN = torch.log_softmax(logits_BN.masked_fill(~batch.candidates_mask_BN, -1e9), -1)
            idx_BK = batch.slate_cand_idx_BK
            return logp_BN.gather(1, idx_BK.clamp(min=0)), idx_BK >= 0
        q_BD, tower = self.net.head(s_BD, beta)
        v_XD = tower(actions.ids, actions.features)
        slate_BK = batch.slate_BK
        if actions.mode == "exact":  # every item's vector is at hand: the slate's are rows of it
            v_BKD = v_XD[slate_BK.clamp(min=0)]
        else:
            v_BKD = tower(slate_BK, self._features(slate_BK))
        l_BK = (v_BKD * q_BD.unsqueeze(1)).sum(-1)
        if actions.mode == "exact":
            logz_B = catalogue_log_normaliser(q_BD, v_XD, self.config.exact_chunk)
        else:
            logz_B = sampled_log_normaliser(l_BK, slate_BK, q_BD @ v_XD.T, actions.ids,
                                            actions.log_q)
        return l_BK - logz_B[:, None], slate_BK >= 0

    def update(self, batch: TransitionBatch,
               return_B: torch.Tensor | None = None) -> ReinforceMetrics:
        """One step; ``return_B`` defaults to the immediate reward (a one-step return)."""
        c = self.config
        R_B = batch.reward_B if return_B is None else return_B
        s_BD = self.net.state.encode(batch.state)
        actions = self.action_set(batch)  # one draw of negatives for π and β
        logp_BK, found_BK = self.slate_log_probs(batch, actions, s_BD)
        beta_logp_BK, _ = self.slate_log_probs(batch, actions, s_BD, beta=True)
        # β: maximum likelihood on every logged slate item found in the action set.
        beta_loss = -(beta_logp_BK * found_BK).sum() / found_BK.sum().clamp(min=1)
        # π: rewarded (clicked) actions only.
        pos_B1 = batch.chosen_B.clamp(min=0).unsqueeze(1)
        use_B = (batch.chosen_B >= 0) & found_BK.gather(1, pos_B1).squeeze(1)
        logp_B = logp_BK.gather(1, pos_B1).squeeze(1)
        pi_B = logp_B.detach().exp()
        if c.behaviour == "learned":
            beta_B = beta_logp_BK.detach().gather(1, pos_B1).squeeze(1).exp()
        else:
            beta_B = batch.propensities_BK.gather(1, pos_B1).squeeze(1) / self.spec.slate_size
        w_B = pg_weights(pi_B, beta_B, self.topk_k, c.weight_cap,
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
        batch = self._batch([t for t, _ in sample])
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
