"""Wolpertinger: DDPG over a large discrete item space (Dulac-Arnold et al. 2015, "Deep
Reinforcement Learning in Large Discrete Action Spaces", arXiv:1512.07679).

The policy π(s) is a pipeline (the paper's Algorithm 1):

    â = f_θ(s)                          actor: a proto-action in the item-embedding space R^D
    A_k = g_k(â)                        the k nearest items to â (faiss / exact kNN)
    π(s) = argmax_{a ∈ A_k} Q_φ(s, e_a)  the critic re-ranks; a slate is the top K of A_k

Training is DDPG on the *full* policy (paper §4.1, Lillicrap et al. 2016):

    y = r + γ (1 - done) max_{a ∈ g_k(f_θ'(s'))} Q_φ'(s', e'_a)     target actor → kNN → argmax
    L_Q = mean (Q_φ(s, e_a) - y)²                                    a = the executed item
    L_f = -mean Q_φ(s, â) + λ ‖â - e_nn(â)‖²                         gradient through â only
    θ' ← τθ + (1-τ)θ',  φ' ← τφ + (1-τ)φ'

Choices and deviations (each deliberate):
- **Executed action.** The replay stores what was executed, never â: here a slate of K items
  of which the user consumed one or none. Every *shown* item is a critic sample (s, e_a, r_a,
  s') with r_a = the click's reward for the consumed item and 0 for the skipped ones, all
  bootstrapping from the same s'. Q(s, a) is therefore "the return of showing a at s": shown
  items are what the policy executed (its slate is the top K of the same ranking), skipped
  items are the natural negatives of an impression log, and a no-click step still teaches
  (all K items earned 0) instead of being dropped or pinned on one arbitrary item.
- **Staying on the item manifold.** Item embeddings e_a and â are L2-normalised, so â lives
  on the unit sphere the items live on, and the actor pays λ ‖â - e_nn‖² (e_nn the nearest
  item, detached) so it cannot drift into regions between items where the critic is blind.
- **The next state's candidates.** When the world offers N candidates per request, the target
  pipeline searches the next request's candidates (``Transition.next_candidates``), falling
  back to the current ones where unknown (terminal rows, which do not bootstrap anyway).
  Without candidates it searches the whole catalogue.
- **Item vectors** are learned (id embedding + linear map of observable features), trained by
  the critic loss; the paper assumes given embeddings. The features are the catalogue's
  (``ItemCatalogue``, issue 13) in every batch and in the table ``features_IF`` the
  whole-catalogue search embeds, the rows serving puts in its ``Candidates``. Before, the
  table held only features of items once seen as candidates, so with no candidate list it
  stayed zero: the search ranked on zeros and the feature map never moved. The id embedding
  gives every item its identity where the request names no candidates.
- **Exploration at serving** is ε-uniform over whole slates (``maths.epsilon_slate``), not
  Gaussian noise on â, because its inclusion probabilities are known exactly: the logged
  propensity is (1-ε)·1[a ∈ greedy slate] + ε·K/N; with ``explore`` off it is 1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recloop.core.catalogue import ItemCatalogue
from recloop.core.ports import Candidates
from recloop.core.spec import WorldSpec
from recloop.learner import checkpoint, nets
from recloop.learner.actor_critic import ActorCriticConfig, fill_features, slate_rewards
from recloop.learner.agent import ReplayAgent
from recloop.learner.batch import RequestBatch, StateBatch, TransitionBatch
from recloop.learner.contract import Metrics
from recloop.learner.maths import soft_update, td_target
from recloop.learner.policy import Ranking, SeededPolicy
from recloop.learner.replay import ReplayBuffer
from recloop.learner.spec import config_from_dict

EXPLORATION_STREAM = 11
"""The serving policy's random stream (``learner.policy`` lists every algorithm's)."""


@dataclass(frozen=True)
class Config(ActorCriticConfig):
    """``ActorCriticConfig`` (D is the dimension of item embeddings and proto-actions;
    critic_lr also trains the item vectors) plus Wolpertinger's own fields."""

    history_mode: str = "mean"
    """How state encoders pool recent positive items: "mean" or "gru"."""
    knn_k: int = 10
    """k, items retrieved around â (clipped to [slate size, N]); k = N scores every item."""
    metric: str = "ip"
    """kNN metric, "ip" (inner product) or "l2"; the same ranking on the unit sphere."""
    manifold_coef: float = 0.1
    """λ, weight of the actor's pull towards its nearest item."""


@dataclass(frozen=True)
class WolpertingerMetrics(Metrics):
    """One DDPG step on the full pipeline (critic, then actor, then the soft target update)."""

    critic_loss: float
    """Mean squared TD error over the shown items."""
    actor_loss: float
    """-mean Q(s, â) + λ ‖â - e_nn‖²."""
    q_mean: float
    """Mean Q(s, e_a) over the shown items."""
    target_mean: float
    """Mean TD target over the shown items."""
    manifold_dist: float
    """Mean ‖â - e_nn‖², how far the proto-actions sit from their nearest item."""
    updates: float
    """Updates so far, this one included."""


# ----------------------------------------------------------------- the paper's pipeline


def knn(proto_BD: torch.Tensor, items: torch.Tensor, mask_BN: torch.Tensor | None, k: int,
        metric: str = "ip") -> tuple[torch.Tensor, torch.Tensor]:
    """g_k: indices (B, k) of the k items nearest to each proto-action, and whether each is a
    real item. ``items`` is (N, D) shared by every row, or (B, N, D) per row."""
    if metric not in ("ip", "l2"):
        raise ValueError(f"unknown kNN metric {metric!r}; use 'ip' or 'l2'")
    ip_BN = proto_BD @ items.T if items.dim() == 2 else torch.einsum("bd,bnd->bn", proto_BD,
                                                                        items)
    # -‖â - e‖² ranks like 2 â·e - ‖e‖² (‖â‖² is constant per row), without a (B, N, D) diff.
    sim_BN = ip_BN if metric == "ip" else 2 * ip_BN - (items**2).sum(-1)
    if mask_BN is not None:
        sim_BN = sim_BN.masked_fill(~mask_BN, float("-inf"))
    top = torch.topk(sim_BN, min(k, sim_BN.shape[1]), dim=1)
    return top.indices, torch.isfinite(top.values)


def gather_items(items: torch.Tensor, idx_Bk: torch.Tensor) -> torch.Tensor:
    """Embeddings (B, k, D) of the indexed items, from (N, D) or (B, N, D)."""
    if items.dim() == 2:
        return items[idx_Bk]
    return items.gather(1, idx_Bk.unsqueeze(-1).expand(-1, -1, items.shape[-1]))


def wolpertinger_value(proto_BD: torch.Tensor, items: torch.Tensor, mask_BN: torch.Tensor | None,
                       k: int, q_fn: Callable[[torch.Tensor], torch.Tensor],
                       metric: str = "ip") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """max_{a ∈ g_k(â)} Q(s, e_a): returns (value_B, q of the k neighbours (B, k) with -inf
    for padding, their indices (B, k)). ``q_fn`` maps (B, k, D) embeddings to (B, k)."""
    idx_Bk, real_Bk = knn(proto_BD, items, mask_BN, k, metric)
    q_Bk = q_fn(gather_items(items, idx_Bk)).masked_fill(~real_Bk, float("-inf"))
    return q_Bk.max(dim=1).values, q_Bk, idx_Bk


# ------------------------------------------------------------------------------ networks


class WolpertingerNet(nn.Module):
    """Actor f_θ(s), critic Q_φ(s, e_a) and the item vectors e_a (unit norm)."""

    def __init__(self, config: Config, spec: WorldSpec) -> None:
        super().__init__()
        def history() -> nets.HistoryEncoder:
            return nets.HistoryEncoder(nets.ItemEmbedding(spec.n_items, config.dim),
                                       config.history_mode)
        self.actor = nets.StateEncoder(spec.user_obs_dim, history(), config.dim, config.hidden)
        self.critic_state = nets.StateEncoder(spec.user_obs_dim, history(), config.dim,
                                              config.hidden[:1])
        self.critic = nets.Critic(config.dim, config.dim, config.hidden)
        self.items = nets.ItemTower(spec.n_items, spec.item_feature_dim, config.dim)

    def proto(self, state: StateBatch) -> torch.Tensor:
        """â_BD on the unit sphere."""
        return F.normalize(self.actor.encode(state), dim=-1)

    def embed(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.items(ids, features), dim=-1)

    def q(self, state: StateBatch) -> Callable[[torch.Tensor], torch.Tensor]:
        """e (B, …, D) ↦ Q(s, e) (B, …), with s encoded once."""
        s_BS = self.critic_state.encode(state)
        return lambda e: self.critic(s_BS, e)

    def critic_parameters(self) -> list[nn.Parameter]:
        return [*self.critic_state.parameters(), *self.critic.parameters(),
                *self.items.parameters()]


# -------------------------------------------------------------------------------- policy


class WolpertingerPolicy(SeededPolicy):
    """Actor → kNN (faiss over the catalogue, exact among a request's candidates) → critic
    re-rank → top K, with ε-uniform exploration while ``explore`` is on."""

    def __init__(self, net: WolpertingerNet, features_IF: torch.Tensor, config: Config,
                 spec: WorldSpec, seed: int, version: int = 0,
                 features_known: bool = False) -> None:
        super().__init__("wolpertinger", version, seed, stream=EXPLORATION_STREAM)
        self.net, self.features_IF, self.config, self.spec = net, features_IF, config, spec
        self.epsilon = config.epsilon
        self._index: tuple[tuple[int, ...], faiss.Index] | None = None
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

    def _catalogue_index(self) -> faiss.Index:
        """A flat faiss index over every item, rebuilt only when the item vectors changed
        (torch bumps ``_version`` on each in-place optimiser step)."""
        key = tuple(p._version for p in self.net.items.parameters()) + (
            self.features_IF._version,)
        if self._index is None or self._index[0] != key:
            index = (faiss.IndexFlatIP if self.config.metric == "ip" else faiss.IndexFlatL2)(
                self.config.dim)
            index.add(np.ascontiguousarray(self.item_embeddings(), np.float32))
            self._index = (key, index)
        return self._index[1]

    def _candidates(self, candidates: Candidates) -> Candidates:
        """An empty list stays empty: ``_score`` searches the catalogue's remembered items."""
        return candidates

    def _score(self, req: RequestBatch, candidates: Candidates, k: int) -> Ranking:
        proto_1D = self.net.proto(req.state)
        if len(candidates) == 0:  # the whole catalogue, searched with faiss
            self.item_features(np.zeros(0, np.int64))  # refuses a table without features
            ids_N, feats_NF = torch.arange(self.spec.n_items), self.features_IF
            k_nn = min(max(self.config.knn_k, k), len(ids_N))
            found = self._catalogue_index().search(proto_1D.numpy(), k_nn)[1][0]
            near_k = torch.from_numpy(found.astype(np.int64))
        else:  # exact search among the request's candidates
            ids_N, feats_NF = req.candidates_BN[0], req.cand_features_BNF[0]
            k_nn = min(max(self.config.knn_k, k), len(ids_N))
            near_k = knn(proto_1D, self.net.embed(ids_N, feats_NF), None, k_nn,
                         self.config.metric)[0][0]
        q_fn = self.net.q(req.state)

        def q_of(idx: np.ndarray | torch.Tensor) -> torch.Tensor:
            idx_t = torch.as_tensor(idx)
            return q_fn(self.net.embed(ids_N[idx_t], feats_NF[idx_t]).unsqueeze(0))[0]

        order_K = near_k[torch.topk(q_of(near_k), k).indices].numpy()
        return Ranking(ids_N.numpy(), order_K, lambda idx_K: q_of(idx_K).numpy())

    @torch.no_grad()
    def item_embeddings(self) -> np.ndarray:
        ids_I = torch.arange(self.spec.n_items)
        return self.net.embed(ids_I, self.features_IF).numpy().copy()


# --------------------------------------------------------------------------------- agent


class WolpertingerAgent(ReplayAgent):
    """DDPG on the full Wolpertinger policy, from a uniform replay of transitions."""

    _policy: WolpertingerPolicy

    def __init__(self, config: Config, spec: WorldSpec, seed: int) -> None:
        if config.metric not in ("ip", "l2"):
            raise ValueError(f"unknown kNN metric {config.metric!r}; use 'ip' or 'l2'")
        super().__init__(config, spec, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = WolpertingerNet(config, spec)
        self.target = copy.deepcopy(self.net).requires_grad_(False)
        self.features_IF = torch.zeros(spec.n_items, spec.item_feature_dim)
        self.actor_opt = torch.optim.Adam(self.net.actor.parameters(), lr=config.actor_lr)
        self.critic_opt = torch.optim.Adam(self.net.critic_parameters(), lr=config.critic_lr)
        self.replay = ReplayBuffer(config.replay_capacity, seed)
        self._policy = WolpertingerPolicy(self.net, self.features_IF, config, spec, seed)

    # ---- candidate sets as embeddings

    def _item_set(self, net: WolpertingerNet, ids_BN: torch.Tensor, feats_BNF: torch.Tensor,
                  mask_BN: torch.Tensor):
        """(item embeddings, mask) to search: the row's candidates, or the whole catalogue."""
        if self.spec.num_candidates == 0:
            return net.embed(torch.arange(self.spec.n_items), self.features_IF), None
        return net.embed(ids_BN, feats_BNF), mask_BN

    @staticmethod
    def next_candidates(batch: TransitionBatch):
        """(ids, features, mask) of the next request's candidates, or of the current ones
        where those are unknown."""
        width = max(batch.next_candidates_BN.shape[1], batch.candidates_BN.shape[1])
        def pad(ids_BN, feats_BNF):
            extra = width - ids_BN.shape[1]
            return F.pad(ids_BN, (0, extra), value=-1), F.pad(feats_BNF, (0, 0, 0, extra))
        nxt_ids, nxt_feats = pad(batch.next_candidates_BN, batch.next_cand_features_BNF)
        cur_ids, cur_feats = pad(batch.candidates_BN, batch.cand_features_BNF)
        known_B1 = (nxt_ids >= 0).any(1, keepdim=True)
        ids_BN = torch.where(known_B1, nxt_ids, cur_ids)
        feats_BNF = torch.where(known_B1.unsqueeze(-1), nxt_feats, cur_feats)
        return ids_BN, feats_BNF, ids_BN >= 0

    @torch.no_grad()
    def target_value(self, batch: TransitionBatch) -> torch.Tensor:
        """max_{a ∈ g_k(f_θ'(s'))} Q_φ'(s', e'_a): the target pipeline on the next state."""
        items, mask = self._item_set(self.target, *self.next_candidates(batch))
        value_B = wolpertinger_value(self.target.proto(batch.next_state), items, mask,
                                     max(self.config.knn_k, 1), self.target.q(batch.next_state),
                                     self.config.metric)[0]
        return value_B.nan_to_num(neginf=0.0)  # a row with no items to search has no future

    # ---- learning

    def update(self, batch: TransitionBatch) -> WolpertingerMetrics:
        cfg = self.config
        shown_BK = batch.slate_mask_BK.float()
        y_BK = td_target(slate_rewards(batch), self.target_value(batch).unsqueeze(1),
                         batch.done_B.unsqueeze(1), cfg.gamma)
        e_BKD = self.net.embed(batch.slate_BK, batch.slate_features_BKF)
        q_BK = self.net.q(batch.state)(e_BKD)
        critic_loss = (((q_BK - y_BK) ** 2) * shown_BK).sum() / shown_BK.sum().clamp(min=1)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_(self.net.critic_parameters(), cfg.grad_clip)
        self.critic_opt.step()

        proto_BD = self.net.proto(batch.state)
        with torch.no_grad():  # the critic and the item vectors are fixed for the actor
            s_BS = self.net.critic_state.encode(batch.state)
            items, mask = self._item_set(self.net, batch.candidates_BN, batch.cand_features_BNF,
                                         batch.candidates_mask_BN)
            nearest_BD = gather_items(items, knn(proto_BD, items, mask, 1, cfg.metric)[0])[:, 0]
        manifold_B = ((proto_BD - nearest_BD) ** 2).sum(-1)
        actor_loss = (-self.net.critic(s_BS, proto_BD) + cfg.manifold_coef * manifold_B).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        nn.utils.clip_grad_norm_(self.net.actor.parameters(), cfg.grad_clip)
        self.actor_opt.step()
        self.critic_opt.zero_grad()  # drop the actor's stray gradients on the critic

        soft_update(self.target, self.net, cfg.tau)
        self.updates += 1
        n_shown = shown_BK.sum().clamp(min=1)
        return WolpertingerMetrics(
            critic_loss=critic_loss.item(), actor_loss=actor_loss.item(),
            q_mean=((q_BK.detach() * shown_BK).sum() / n_shown).item(),
            target_mean=((y_BK * shown_BK).sum() / n_shown).item(),
            manifold_dist=manifold_B.mean().item(), updates=float(self.updates))

    # ---- snapshots

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


AGENT = WolpertingerAgent


def load_policy(tensors: dict[str, np.ndarray], manifest: dict,
                spec: WorldSpec) -> WolpertingerPolicy:
    """Inference-only policy from a snapshot (``manifest["config"]`` is ``config_dict()``)."""
    config = config_from_dict(Config, manifest.get("config", {}))
    net = WolpertingerNet(config, spec)
    nets.module_from_arrays("net", net, tensors)
    features_IF = torch.from_numpy(np.array(tensors["item_features"], np.float32))
    policy = WolpertingerPolicy(net, features_IF, config, spec, 0,
                                version=int(manifest.get("version", 0)), features_known=True)
    return checkpoint.resume_policy_rng(policy, tensors)
