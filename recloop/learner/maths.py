"""The papers' concepts as small, pure, named functions (each unit-tested by hand).

Temporal difference and targets
    ``td_target``                 y = r + γ (1 - done) V(s')
    ``discounted_returns``        R_t = Σ_{t'≥t} γ^{t'-t} r_{t'}, restarting after each done
    ``soft_update`` / ``hard_update``   θ' ← τθ + (1-τ)θ'  (Lillicrap et al. 2016)

Off-policy correction (Chen et al. 2019, "Top-K Off-Policy Correction for a REINFORCE
Recommender System")
    ``capped_importance_weight``  min(π/β, c)                        (§4.3 weight capping)
    ``topk_lambda``               λ_K = K (1 - π)^(K-1)              (eq. 6)
    ``topk_inclusion_prob``       α = 1 - (1 - π)^K                  (§4.2)

Slates (Ie et al. 2019, "SlateQ")
    ``choice_affinity``           v(s,i): exp(score) (conditional logit) or score (proportional)
    ``slate_choice_probs``        P(i|s,A) = v_i / (v_⊥ + Σ_{j∈A} v_j)
    ``slate_value``               Q(s,A) = Σ_{i∈A} P(i|s,A) Q̄(s,i)    (the decomposition)
    ``select_slate_topk``         top K by v_i Q̄_i
    ``select_slate_greedy``       add argmax (N + v_i Q̄_i)/(D + v_i) one item at a time
    ``select_slate_exact``        the fractional programme as an LP (Charnes-Cooper transform)
    ``select_slate_enumerate``    brute force, for tiny catalogues and tests

Honest exploration (serving)
    ``pps_inclusion_probs``       inclusion probabilities ∝ weights, capped at 1, summing to m
    ``systematic_sample``         Madow's systematic sampling: m distinct items whose inclusion
                                  probabilities are exactly the given ones
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn

# --------------------------------------------------------------------------- TD and targets


def td_target(reward_B: torch.Tensor, next_value_B: torch.Tensor, done_B: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """y = r + γ (1 - done) V(s'). ``done_B`` is 0/1 (float or bool)."""
    return reward_B + gamma * (1.0 - done_B.float()) * next_value_B


def discounted_returns(reward_T: np.ndarray, done_T: np.ndarray, gamma: float) -> np.ndarray:
    """Return-to-go along one time-ordered stream; a done at t cuts the sum after t."""
    out_T = np.zeros(len(reward_T), np.float64)
    running = 0.0
    for t in range(len(reward_T) - 1, -1, -1):
        if done_T[t]:
            running = 0.0
        running = float(reward_T[t]) + gamma * running
        out_T[t] = running
    return out_T


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """θ' ← τθ + (1-τ)θ' for every parameter (buffers are copied)."""
    for p_t, p_s in zip(target.parameters(), source.parameters(), strict=True):
        p_t.lerp_(p_s, tau)
    for b_t, b_s in zip(target.buffers(), source.buffers(), strict=True):
        b_t.copy_(b_s)


@torch.no_grad()
def hard_update(target: nn.Module, source: nn.Module) -> None:
    """θ' ← θ."""
    target.load_state_dict(source.state_dict())


# ------------------------------------------------------------------ off-policy correction


def capped_importance_weight(pi: torch.Tensor, beta: torch.Tensor, cap: float,
                             eps: float = 1e-8) -> torch.Tensor:
    """min(π/β, c): the paper's capped importance weight (β floored at ``eps``)."""
    return torch.clamp(pi / beta.clamp(min=eps), max=cap)


def topk_lambda(pi: torch.Tensor, k: int) -> torch.Tensor:
    """λ_K(s,a) = K (1 - π(a|s))^(K-1): the top-K correction multiplier.

    λ_K → K as π → 0 (push unlikely items harder), → 0 as π → 1 (the item is already in the
    slate); K = 1 gives 1, the standard correction.
    """
    return k * (1.0 - pi) ** (k - 1)


def topk_inclusion_prob(pi: torch.Tensor, k: int) -> torch.Tensor:
    """α = 1 - (1 - π)^K: chance an item appears among K independent draws from π."""
    return 1.0 - (1.0 - pi) ** k


# ----------------------------------------------------------------------------- slates


def choice_affinity(scores: torch.Tensor, model: str) -> torch.Tensor:
    """v(s,i) from a choice score: ``"logit"`` → exp(score), ``"proportional"`` → score ≥ 0."""
    if model == "logit":
        return torch.exp(scores)
    if model == "proportional":
        return scores.clamp(min=0.0)
    raise ValueError(f"unknown choice model {model!r}; use 'logit' or 'proportional'")


def slate_choice_probs(v_BK: torch.Tensor, v_null_B: torch.Tensor,
                       mask_BK: torch.Tensor | None = None) -> torch.Tensor:
    """P(i|s,A) = v_i / (v_⊥ + Σ_{j∈A} v_j); masked slots get 0. The no-click probability is
    ``1 - P.sum(-1)``."""
    if mask_BK is not None:
        v_BK = v_BK * mask_BK
    return v_BK / (v_null_B.unsqueeze(-1) + v_BK.sum(-1, keepdim=True))


def slate_value(v_BK: torch.Tensor, q_BK: torch.Tensor, v_null_B: torch.Tensor,
                mask_BK: torch.Tensor | None = None) -> torch.Tensor:
    """Q(s,A) = Σ_{i∈A} P(i|s,A) Q̄(s,i): SlateQ's decomposition (the null item adds 0)."""
    return (slate_choice_probs(v_BK, v_null_B, mask_BK) * q_BK).sum(-1)


def _valid(v_N: np.ndarray, mask_N: np.ndarray | None) -> np.ndarray:
    return np.ones(len(v_N), bool) if mask_N is None else np.asarray(mask_N, bool)


def select_slate_topk(v_N: np.ndarray, q_N: np.ndarray, k: int,
                      mask_N: np.ndarray | None = None) -> np.ndarray:
    """The k candidate indices with the largest v_i Q̄_i, best first (SlateQ's "TS")."""
    score_N = np.where(_valid(v_N, mask_N), np.asarray(v_N) * np.asarray(q_N), -np.inf)
    return np.argsort(-score_N, kind="stable")[:k]


def select_slate_greedy(v_N: np.ndarray, q_N: np.ndarray, v_null: float, k: int,
                        mask_N: np.ndarray | None = None) -> np.ndarray:
    """Greedy: repeatedly add the item maximising (N + v_i Q̄_i) / (D + v_i), where
    N = Σ_A v Q̄ and D = v_⊥ + Σ_A v. Always returns exactly k items (a full slate)."""
    v_N, q_N = np.asarray(v_N, np.float64), np.asarray(q_N, np.float64)
    free_N = _valid(v_N, mask_N).copy()
    num, den, chosen = 0.0, float(v_null), []
    for _ in range(k):
        gain_N = np.where(free_N, (num + v_N * q_N) / np.maximum(den + v_N, 1e-12), -np.inf)
        i = int(np.argmax(gain_N))
        chosen.append(i)
        free_N[i] = False
        num, den = num + v_N[i] * q_N[i], den + v_N[i]
    return np.array(chosen, np.int64)


def select_slate_exact(v_N: np.ndarray, q_N: np.ndarray, v_null: float, k: int,
                       mask_N: np.ndarray | None = None) -> np.ndarray:
    """The best slate of exactly k items, by linear programming.

    max_x Σ x_i v_i Q̄_i / (v_⊥ + Σ x_i v_i) s.t. Σ x_i = k, 0 ≤ x ≤ 1 is a linear-fractional
    programme; Charnes-Cooper (y = x t, t = 1/(v_⊥ + Σ x_i v_i)) makes it the LP
        max Σ v_i Q̄_i y_i  s.t.  v_⊥ t + Σ v_i y_i = 1,  Σ y_i = k t,  0 ≤ y_i ≤ t.
    Its feasible set's vertices are slates (x integral), and a simplex solver returns a vertex.
    Deviation from the paper: the paper allows slates of *up to* k items; recloop serves
    exactly k, hence the equality. Items are returned by decreasing v_i Q̄_i.
    """
    valid_N = _valid(v_N, mask_N)
    idx = np.flatnonzero(valid_N)
    v, q = np.asarray(v_N, np.float64)[idx], np.asarray(q_N, np.float64)[idx]
    n = len(idx)
    if n <= k:
        return idx[np.argsort(-(v * q), kind="stable")]
    c = np.concatenate([-(v * q), [0.0]])  # variables (y_1..y_n, t); linprog minimises
    a_eq = np.vstack([np.concatenate([v, [v_null]]), np.concatenate([np.ones(n), [-k]])])
    b_eq = np.array([1.0, 0.0])
    a_ub = np.hstack([np.eye(n), -np.ones((n, 1))])  # y_i - t <= 0
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=b_eq,
                  bounds=[(0, None)] * (n + 1), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"slate LP failed: {res.message}")
    x = res.x[:n] / res.x[n]
    top = np.argsort(-x, kind="stable")[:k]
    top = top[np.argsort(-(v[top] * q[top]), kind="stable")]
    return idx[top]


def select_slate_enumerate(v_N: np.ndarray, q_N: np.ndarray, v_null: float, k: int,
                           mask_N: np.ndarray | None = None) -> np.ndarray:
    """Brute force over all C(N, k) slates: only for tiny catalogues (and tests)."""
    idx = np.flatnonzero(_valid(v_N, mask_N))
    v, q = np.asarray(v_N, np.float64), np.asarray(q_N, np.float64)
    best, best_val = np.zeros(0, np.int64), -np.inf
    for slate in combinations(idx, min(k, len(idx))):
        s = np.array(slate)
        val = float((v[s] * q[s]).sum() / (v_null + v[s].sum()))
        if val > best_val + 1e-12:
            best, best_val = s, val
    return best


SLATE_SELECTORS = {"topk": None, "greedy": select_slate_greedy, "exact": select_slate_exact}


# ------------------------------------------------------------------ honest exploration


def pps_inclusion_probs(weights_N: np.ndarray, m: int) -> np.ndarray:
    """Inclusion probabilities proportional to ``weights_N``, capped at 1, summing to m.

    Items whose proportional share exceeds 1 are taken for certain and the rest re-share
    what is left (the standard capping for probability-proportional-to-size sampling).
    """
    w = np.maximum(np.asarray(weights_N, np.float64), 0.0)
    n = len(w)
    if m > n:
        raise ValueError(f"cannot include {m} of {n} items")
    if m == 0:
        return np.zeros(n)
    certain = np.zeros(n, bool)
    for _ in range(n):
        rest = ~certain
        left = m - certain.sum()
        total = w[rest].sum()
        share = np.where(rest, w * left / total, 1.0) if total > 0 else np.where(
            rest, left / rest.sum(), 1.0)
        over = rest & (share >= 1.0)
        if not over.any():
            return np.clip(share, 0.0, 1.0)
        certain |= over
    return np.where(certain, 1.0, 0.0)


def systematic_sample(incl_N: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Madow's systematic sampling: draws round(Σ incl) distinct indices with
    P(i included) = incl_N[i] exactly (each incl ≤ 1). One uniform u, points u, u+1, ...
    on the cumulative sums; an item whose interval (length incl_i ≤ 1) holds a point is in."""
    incl = np.asarray(incl_N, np.float64)
    m = int(round(incl.sum()))
    edges = np.concatenate([[0.0], np.cumsum(incl)])
    edges[-1] = m  # guard against round-off at the far end
    points = rng.random() + np.arange(m)
    return np.searchsorted(edges, points, side="right") - 1


def epsilon_slate(top_K: np.ndarray, n: int, epsilon: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ε-uniform exploration around a deterministic slate ``top_K`` (indices into n items).

    With probability ε the whole slate is k distinct items drawn uniformly, else ``top_K``.
    Returns (indices_K, inclusion probabilities_K): P(i ∈ slate) = (1-ε)·1[i ∈ top_K] + ε·k/n,
    the honest propensity of each served item.
    """
    k = len(top_K)
    idx_K = rng.choice(n, size=k, replace=False) if rng.random() < epsilon else np.asarray(top_K)
    in_top_K = np.isin(idx_K, top_K)
    return idx_K, (1.0 - epsilon) * in_top_K + epsilon * k / n
