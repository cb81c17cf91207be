"""DRR: actor-critic recommendation with an explicit state representation module (Liu et al.
2018, "Deep Reinforcement Learning based Recommendation with Explicit User-Item Interactions
Modeling", arXiv:1810.12027).

State. H = (i_1 .. i_n) are the embeddings of the user's n most recent *positive* items
(n = ``WorldSpec.history_len``, 5 by default; the streams fold advances the window only on a
click, so it arrives as ``state.history``) and u is the user's embedding. With learned
per-position weights w_a, the state representation module is one of (paper §3.3):

    DRR-ave  s = [u ; u ⊙ ave ; ave],  ave = Σ_a w_a i_a                       (3D)
    DRR-p    s = [i_1 .. i_n ; {w_a i_a ⊙ w_b i_b | a < b}]            ((n + n(n-1)/2) D)
    DRR-u    s = [{u ⊙ w_a i_a | a ≤ n} ; {w_a i_a ⊙ w_b i_b | a < b}]  ((n + n(n-1)/2) D)

Slot n always holds the most recent item (histories shorter than n are right-aligned and the
empty slots are zero), so w_a weighs an item by its recency.

Policy. The actor maps s to a ranking vector a = π(s) ∈ R^D; item i scores e_i · a (no
softmax) and the slate is the top K. Exploration is ε-greedy over whole slates
(``maths.epsilon_slate``), whose inclusion probabilities are logged as propensities.

Learning (paper Algorithm 1, DDPG with target networks and prioritised replay):

    y = r + γ (1 - done) Q'(s', π'(s'))          target module, actor and critic on s'
    L_Q = Σ_b w_b (Q(s, a) - y)² / Σ_b 1          w_b: PER importance weights; |δ| → priority
    L_π = -mean Q(s, π(s))
    θ' ← τθ + (1-τ)θ'

Deviations, each deliberate:
- **The action that was executed.** Transitions log the served items, not the vector a the
  behaviour actor produced, so the executed action is represented by an item's embedding:
  a = e_i ranks i first, since item vectors and π(s) are unit-norm (cos similarity ranking).
  Every shown item is a critic sample with the click's reward if it was consumed and 0 if
  skipped, all bootstrapping from the same s' (as in ``wolpertinger``: impressions are
  natural negatives and no-click steps still teach). A transition's priority is the mean |δ|
  of its shown items.
- **Item features come from the catalogue** (``ItemCatalogue``, issue 13): every batch's
  rows and the table ``features_IF`` that embeds histories and the whole catalogue are the
  catalogue's, the rows serving puts in its ``Candidates``. Before, the table held only
  features of items once seen as candidates, so with no candidate list (a whole catalogue)
  it stayed zero and the feature weights of the item tower never moved. Item identity comes
  from the tower's id embedding, which a whole catalogue needs most.
- **u** is a linear map of the user's observation (simulated users are new every session,
  so a per-id embedding would never be trained twice); item vectors are learned (id
  embedding + linear map of observable features) rather than pre-trained PMF factors.
- The state representation module is trained by the critic loss; the actor reads s
  detached (the usual shared-encoder arrangement in DDPG), so the actor cannot reshape the
  state to flatter its own critic.
- The paper's "a, b" in DRR-p/DRR-u's pairwise term is taken as unordered pairs a < b: the
  element-wise product is symmetric and a = b would only square single items.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Transition
from recloop.core.ports import Candidates
from recloop.core.spec import WorldSpec
from recloop.learner import checkpoint, nets
from recloop.learner.actor_critic import ActorCriticConfig, fill_features, slate_rewards
from recloop.learner.agent import ReplayAgent
from recloop.learner.batch import RequestBatch, StateBatch, TransitionBatch
from recloop.learner.contract import Metrics
from recloop.learner.maths import soft_update, td_target
from recloop.learner.policy import Ranking, SeededPolicy
from recloop.learner.replay import PrioritisedReplay
from recloop.learner.spec import config_from_dict

STATE_REPS = ("ave", "p", "u")
EXPLORATION_STREAM = 13
"""The serving policy's random stream (``learner.policy`` lists every algorithm's)."""


@dataclass(frozen=True)
class Config(ActorCriticConfig):
    """``ActorCriticConfig`` (D is the dimension of item, user and action vectors; critic_lr
    also trains the state representation module) plus DRR's own fields."""

    state_rep: str = "ave"
    """State representation module: "ave" (DRR-ave), "p" (DRR-p) or "u" (DRR-u)."""
    per_alpha: float = 0.6
    """Prioritisation exponent α (0 = uniform)."""
    per_beta: float = 0.4
    """Importance-weight exponent β (1 = full correction)."""


@dataclass(frozen=True)
class DRRMetrics(Metrics):
    """One DDPG step (critic, then actor, then the soft target update)."""

    critic_loss: float
    """Importance-weighted squared TD error over the shown items."""
    actor_loss: float
    """-mean Q(s, π(s))."""
    q_mean: float
    """Mean Q(s, e_a) over the shown items."""
    target_mean: float
    """Mean TD target over the shown items."""
    td_abs: float
    """Mean |δ| per transition (the new replay priorities)."""
    updates: float
    """Updates so far, this one included."""


# ------------------------------------------------------------ state representation module


def right_align(history_BH: torch.Tensor, mask_BH: torch.Tensor):
    """Move each row's real items (left-aligned, oldest first) to the end, so the last slot
    always holds the most recent one. Returns (history_BH, mask_BH), -1 / False padded."""
    H = history_BH.shape[1]
    shift_B1 = H - mask_BH.sum(1, keepdim=True)
    src_BH = torch.arange(H).unsqueeze(0) - shift_B1
    real_BH = src_BH >= 0
    out_BH = history_BH.gather(1, src_BH.clamp(min=0))
    return torch.where(real_BH, out_BH, torch.full_like(out_BH, -1)), real_BH


def pairwise_products(x_BnD: torch.Tensor) -> torch.Tensor:
    """{x_a ⊙ x_b | a < b}: (B, n(n-1)/2, D) in row-major order of (a, b)."""
    a, b = torch.triu_indices(x_BnD.shape[1], x_BnD.shape[1], offset=1)
    return x_BnD[:, a] * x_BnD[:, b]


def drr_state(mode: str, u_BD: torch.Tensor, items_BnD: torch.Tensor,
              w_n: torch.Tensor) -> torch.Tensor:
    """The paper's three state representations (see the module docstring)."""
    wi_BnD = w_n.view(1, -1, 1) * items_BnD
    if mode == "ave":
        ave_BD = wi_BnD.sum(1)
        return torch.cat([u_BD, u_BD * ave_BD, ave_BD], dim=-1)
    pairs_BX = pairwise_products(wi_BnD).flatten(1)
    if mode == "p":
        return torch.cat([items_BnD.flatten(1), pairs_BX], dim=-1)
    if mode == "u":
        return torch.cat([(u_BD.unsqueeze(1) * wi_BnD).flatten(1), pairs_BX], dim=-1)
    raise ValueError(f"unknown DRR state representation {mode!r}; use one of {STATE_REPS}")


def state_dim(mode: str, n: int, dim: int) -> int:
    return 3 * dim if mode == "ave" else (n + n * (n - 1) // 2) * dim


class StateRepresentation(nn.Module):
    """u from the observation, i_a from the item tower, s = drr_state(mode, u, H, w)."""

    def __init__(self, mode: str, spec: WorldSpec, dim: int) -> None:
        super().__init__()
        if mode not in STATE_REPS:
            raise ValueError(f"unknown DRR state representation {mode!r}; use one of "
                             f"{STATE_REPS}")
        n = spec.history_len
        self.mode, self.out_dim = mode, state_dim(mode, n, dim)
        self.items = nets.ItemTower(spec.n_items, spec.item_feature_dim, dim)
        self.user = nn.Linear(max(spec.user_obs_dim, 1), dim)  # a constant input if U = 0
        # Pooling starts as a plain mean; products start unscaled so they are not ~1/n².
        self.w = nn.Parameter(torch.full((n,), 1.0 / n if mode == "ave" else 1.0))

    def embed(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm item vectors e_i."""
        return F.normalize(self.items(ids, features), dim=-1)

    def forward(self, state: StateBatch, features_IF: torch.Tensor) -> torch.Tensor:
        hist_Bn, real_Bn = right_align(state.history_BH, state.history_mask_BH)
        items_BnD = self.embed(hist_Bn, features_IF[hist_Bn.clamp(min=0)]) * real_Bn.unsqueeze(-1)
        obs_BU = state.user_obs_BU
        if obs_BU.shape[1] == 0:
            obs_BU = torch.ones(obs_BU.shape[0], 1)
        return drr_state(self.mode, self.user(obs_BU), items_BnD, self.w)


class DRRNet(nn.Module):
    """State representation module, actor π(s) (unit norm) and critic Q(s, a)."""

    def __init__(self, config: Config, spec: WorldSpec) -> None:
        super().__init__()
        self.rep = StateRepresentation(config.state_rep, spec, config.dim)
        self.actor = nets.mlp(self.rep.out_dim, config.hidden, config.dim)
        self.critic = nets.Critic(self.rep.out_dim, config.dim, config.hidden)

    def act(self, s_BS: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.actor(s_BS), dim=-1)

    def critic_parameters(self) -> list[nn.Parameter]:
        return [*self.rep.parameters(), *self.critic.parameters()]


# -------------------------------------------------------------------------------- policy


class DRRPolicy(SeededPolicy):
    """Top K of e_i · π(s), ε-greedy while ``explore`` is on."""

    def __init__(self, net: DRRNet, features_IF: torch.Tensor, config: Config, spec: WorldSpec,
                 seed: int, version: int = 0, features_known: bool = False) -> None:
        super().__init__("drr", version, seed, stream=EXPLORATION_STREAM)
        self.net, self.features_IF, self.config, self.spec = net, features_IF, config, spec
        self.epsilon = config.epsilon
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None
        # Whether features_IF holds a catalogue (a snapshot's, or one set here).
        self.features_known = features_known or spec.item_feature_dim == 0

    def set_catalogue(self, catalogue: ItemCatalogue | None) -> None:
        """Also refill the shared item table from ``catalogue`` (``actor_critic``)."""
        super().set_catalogue(catalogue)
        self.features_known = fill_features(self.features_IF, catalogue) or self.features_known

    def item_features(self, ids: np.ndarray) -> np.ndarray:
        """The rows of the item table, which a request without candidates is ranked with."""
        if not self.features_known:
            return super().item_features(ids)  # refuses: no catalogue
        return self.features_IF[torch.as_tensor(np.asarray(ids, np.int64))].numpy()

    def _catalogue(self) -> torch.Tensor:
        """Every item's vector, recomputed only when the item tower or the remembered
        features changed (torch bumps ``_version`` on each in-place optimiser step)."""
        key = tuple(p._version for p in self.net.rep.items.parameters()) + (
            self.features_IF._version,)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.net.rep.embed(torch.arange(self.spec.n_items),
                                                   self.features_IF))
        return self._cache[1]

    def _candidates(self, candidates: Candidates) -> Candidates:
        """An empty list stays empty: ``_score`` ranks the catalogue's remembered items."""
        return candidates

    def _score(self, req: RequestBatch, candidates: Candidates, k: int) -> Ranking:
        a_D = self.net.act(self.net.rep(req.state, self.features_IF))[0]
        if len(candidates) == 0:  # the whole catalogue
            self.item_features(np.zeros(0, np.int64))  # refuses a table without features
            ids_N, e_ND = np.arange(self.spec.n_items, dtype=np.int64), self._catalogue()
        else:
            ids_N = candidates.ids.astype(np.int64)
            e_ND = self.net.rep.embed(req.candidates_BN, req.cand_features_BNF)[0]
        scores_N = e_ND @ a_D
        return Ranking.dense(ids_N, torch.topk(scores_N, k).indices.numpy(), scores_N.numpy())

    @torch.no_grad()
    def item_embeddings(self) -> np.ndarray:
        return self._catalogue().numpy().copy()


# --------------------------------------------------------------------------------- agent


class DRRAgent(ReplayAgent):
    """DDPG with target networks and proportional prioritised replay."""

    replay: PrioritisedReplay
    _policy: DRRPolicy

    def __init__(self, config: Config, spec: WorldSpec, seed: int) -> None:
        super().__init__(config, spec, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = DRRNet(config, spec)
        self.target = copy.deepcopy(self.net).requires_grad_(False)
        self.features_IF = torch.zeros(spec.n_items, spec.item_feature_dim)
        self.actor_opt = torch.optim.Adam(self.net.actor.parameters(), lr=config.actor_lr)
        self.critic_opt = torch.optim.Adam(self.net.critic_parameters(), lr=config.critic_lr)
        self.replay = PrioritisedReplay(config.replay_capacity, seed, alpha=config.per_alpha,
                                        beta=config.per_beta)
        self._policy = DRRPolicy(self.net, self.features_IF, config, spec, seed)

    @torch.no_grad()
    def target_value(self, batch: TransitionBatch) -> torch.Tensor:
        """Q'(s', π'(s')) with the target module, actor and critic."""
        s_BS = self.target.rep(batch.next_state, self.features_IF)
        return self.target.critic(s_BS, self.target.act(s_BS))

    def update(self, batch: TransitionBatch) -> DRRMetrics:
        return self._update(batch, torch.ones(batch.size))[0]

    def _update(self, batch: TransitionBatch,
                weights_B: torch.Tensor) -> tuple[DRRMetrics, torch.Tensor]:
        """One DDPG step with importance weights; returns (metrics, |δ| per transition)."""
        cfg = self.config
        shown_BK = batch.slate_mask_BK.float()
        y_BK = td_target(slate_rewards(batch), self.target_value(batch).unsqueeze(1),
                         batch.done_B.unsqueeze(1), cfg.gamma)
        s_BS = self.net.rep(batch.state, self.features_IF)
        e_BKD = self.net.rep.embed(batch.slate_BK, batch.slate_features_BKF)
        q_BK = self.net.critic(s_BS, e_BKD)
        td_BK = (q_BK - y_BK) * shown_BK
        n_shown = shown_BK.sum().clamp(min=1)
        critic_loss = (weights_B.unsqueeze(1) * td_BK**2).sum() / n_shown
        self.critic_opt.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_(self.net.critic_parameters(), cfg.grad_clip)
        self.critic_opt.step()

        with torch.no_grad():
            s_BS = self.net.rep(batch.state, self.features_IF)
        actor_loss = -self.net.critic(s_BS, self.net.act(s_BS)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        nn.utils.clip_grad_norm_(self.net.actor.parameters(), cfg.grad_clip)
        self.actor_opt.step()
        self.critic_opt.zero_grad()  # drop the actor's stray gradients on the critic

        soft_update(self.target, self.net, cfg.tau)
        self.updates += 1
        td_abs_B = td_BK.detach().abs().sum(1) / shown_BK.sum(1).clamp(min=1)
        metrics = DRRMetrics(critic_loss=critic_loss.item(), actor_loss=actor_loss.item(),
                             q_mean=((q_BK.detach() * shown_BK).sum() / n_shown).item(),
                             target_mean=((y_BK * shown_BK).sum() / n_shown).item(),
                             td_abs=td_abs_B.mean().item(), updates=float(self.updates))
        return metrics, td_abs_B

    def _update_on(self, sample: tuple[list[Transition], np.ndarray, np.ndarray]
                   ) -> DRRMetrics:
        """One weighted update on a prioritised sample, then its slots' new priorities."""
        items, slots, weights = sample
        metrics, td_abs_B = self._update(self._batch(items), torch.from_numpy(weights))
        self.replay.update_priorities(slots, td_abs_B.numpy())
        return metrics

    def _snapshot_parts(self) -> checkpoint.AgentParts:
        return checkpoint.AgentParts({"net": self.net, "target": self.target},
                                     {"actor_opt": self.actor_opt, "critic_opt": self.critic_opt},
                                     self.replay)

    def _snapshot_extra(self) -> dict[str, np.ndarray]:
        return {"item_features": self.features_IF.numpy().copy()}

    def _load_extra(self, tensors: dict[str, np.ndarray]) -> None:
        """The saved item table, unless the agent holds a catalogue (which is newer)."""
        if self.catalogue is None:
            self.features_IF.copy_(torch.from_numpy(np.array(tensors["item_features"])))
            self._policy.features_known = True


AGENT = DRRAgent


def load_policy(tensors: dict[str, np.ndarray], manifest: dict, spec: WorldSpec) -> DRRPolicy:
    """Inference-only policy from a snapshot (``manifest["config"]`` is ``config_dict()``)."""
    config = config_from_dict(Config, manifest.get("config", {}))
    net = DRRNet(config, spec)
    nets.module_from_arrays("net", net, tensors)
    features_IF = torch.from_numpy(np.array(tensors["item_features"], np.float32))
    policy = DRRPolicy(net, features_IF, config, spec, 0, version=int(manifest.get("version", 0)),
                       features_known=True)
    return checkpoint.resume_policy_rng(policy, tensors)
