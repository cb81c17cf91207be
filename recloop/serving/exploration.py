"""ε-mixing with the uniform slate, logging the mixture's true inclusion probabilities.

With probability ε the served slate is K distinct candidates drawn uniformly, otherwise the
policy's own slate S. Item i is then shown with probability

    P(i) = (1 - ε) · p_π(i) + ε · K / N

where p_π(i) is i's inclusion probability under the policy. The policy reports p_π only
for the items of the slate it drew, which is all the policy branch needs. The uniform
branch also needs p_π of items outside S, and those are known exactly when S is the
policy's *only* possible slate: inclusion probabilities over all items sum to K, so if
S's K items each have p_π = 1, every other item has p_π = 0. Whether that holds depends
on the observation alone (a policy that can draw another slate never draws one of total
mass K), so deciding by it does not bias the draw.

A policy that is stochastic at this observation already explores; it is served as drawn,
with its own propensities, and the request is counted as passed through. A policy that
can say ``inclusion_probabilities(observation, candidates, k) -> (N,)`` is mixed exactly
in every case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recloop.core.ports import Candidates, Observation, Slate, SlatePolicy

# A slate of K probability-one items has mass exactly K; allow float round-off only.
_MASS_TOL = 1e-9


@dataclass(frozen=True)
class Explored:
    """The served slate and how it came about."""

    slate: Slate
    branch: str  # "policy", "uniform" or "passthrough"


def explore(
    policy: SlatePolicy,
    slate: Slate,
    observation: Observation,
    candidates: Candidates,
    k: int,
    epsilon: float,
    rng: np.random.Generator,
) -> Explored:
    """Mix the policy's ``slate`` with a uniform slate at rate ``epsilon``."""
    if epsilon <= 0.0:
        return Explored(slate, "policy")
    n = len(candidates)
    uniform_p = k / n
    inclusion_N = _policy_inclusion(policy, slate, observation, candidates, k)
    if inclusion_N is None:
        return Explored(slate, "passthrough")
    if rng.random() >= epsilon:
        props_K = (1.0 - epsilon) * np.asarray(slate.propensities, dtype=np.float64) + (
            epsilon * uniform_p
        )
        return Explored(_with_propensities(slate, props_K), "policy")
    picks_K = rng.choice(n, size=k, replace=False)
    props_K = (1.0 - epsilon) * inclusion_N[picks_K] + epsilon * uniform_p
    # Scores of the policy where it ranked the item, 0 for items only exploration picked.
    score_of = dict(
        zip(np.asarray(slate.items).tolist(), np.asarray(slate.scores).tolist(), strict=True)
    )
    ids_K = candidates.ids[picks_K].astype(np.int64)
    scores_K = np.array([score_of.get(int(i), 0.0) for i in ids_K], dtype=np.float64)
    return Explored(Slate(items=ids_K, scores=scores_K, propensities=props_K), "uniform")


def _policy_inclusion(
    policy: SlatePolicy, slate: Slate, observation: Observation, candidates: Candidates, k: int
) -> np.ndarray | None:
    """p_π over all N candidates when it is known exactly, else ``None``."""
    exact = getattr(policy, "inclusion_probabilities", None)
    if callable(exact):
        return np.asarray(exact(observation, candidates, k), dtype=np.float64)
    props_K = np.asarray(slate.propensities, dtype=np.float64)
    if abs(float(props_K.sum()) - k) > _MASS_TOL * k:
        return None
    inclusion_N = np.zeros(len(candidates))
    inclusion_N[np.isin(candidates.ids, np.asarray(slate.items))] = 1.0
    return inclusion_N


def _with_propensities(slate: Slate, props_K: np.ndarray) -> Slate:
    return Slate(items=slate.items, scores=slate.scores, propensities=props_K, info=slate.info)
