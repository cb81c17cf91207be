"""The top-K paper's toy through the agent's public update path (issue 13, item 5).

Chen et al. 2019, §4.2: 10 items with rewards (10, 9, 1, ..., 1), a uniform behaviour policy,
slates of K = 2. Maximising Σ_a r(a) (1 - (1 - π_a)^K) puts π at (0.526, 0.474, 0, ..., 0);
the standard correction (λ = 1) puts all mass on item 1. ``test_topk_paper`` checks the
gradient-weight function alone by exact expected-gradient ascent; here the whole
``ReinforceAgent`` learns it from logged ``Transition`` records through ``learn_many``: session
holding, returns, replay, the learned β head, and the action set's normaliser, which is the
request's candidate list, the exact catalogue softmax, or the sampled one (log-Q corrected,
shared negatives, accidental hits removed).

The logs are exactly the uniform behaviour policy: every 90 transitions hold each of the 45
two-item slates once with each of its items clicked (order shuffled, seeded), reward r(click),
one-step sessions. With a fixed step size the learner hovers around its fixed point (about
±0.03 on this toy, whatever the step size), so π is measured as the mean of the policy's
probabilities after each of the last ``AVERAGED`` ``learn_many`` calls (Polyak-Ruppert
averaging of the iterates' policy), which estimates the point it hovers around.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Transition, UserView
from recloop.core.spec import WorldSpec
from recloop.learner import registry
from recloop.learner.batch import StateBatch

torch.set_num_threads(1)
REWARDS = [10.0, 9.0] + [1.0] * 8
N_ITEMS, K, F = 10, 2, 3
C = 1.0 / (1.0 / 10 + 1.0 / 9)
FIXED_POINT = [1 - C / 10, 1 - C / 9]  # (0.526, 0.474)
CALL = 256  # transitions per learn_many call
AVERAGED = 16  # the last calls whose policies are averaged
TRAINING = dict(lr=0.004, batch_size=128, update_every=2, learning_starts=256,
                history_mode="mean")
MODES = {  # how a request names its items, and the agent's normaliser when it names none
    "candidate-list": (True, {}),
    "whole-catalogue-exact": (False, {}),
    "whole-catalogue-sampled": (False, {"exact_max_items": 0, "sampled_softmax": 256}),
}
SLATES = [(list(pair), click) for pair in itertools.combinations(range(N_ITEMS), 2)
          for click in range(K)]


def logged(spec: WorldSpec, n: int, rng: np.random.Generator) -> list[Transition]:
    """``n`` one-step sessions from the uniform behaviour policy, in whole strata of 90."""
    out: list[Transition] = []
    order = np.concatenate([rng.permutation(len(SLATES)) for _ in range(-(-n // len(SLATES)))])
    for t in range(n):
        slate, pos = SLATES[order[t]]
        if rng.integers(2):
            slate, pos = slate[::-1], K - 1 - pos
        out.append(Transition(
            transition_id=str(t), user_id=f"u{t}", session_id=f"s{t}", request_id=f"r{t}",
            state=UserView(observation=[]), slate=slate, propensities=[K / N_ITEMS] * K,
            candidates=rng.permutation(N_ITEMS).tolist() if spec.num_candidates else [],
            policy="uniform", policy_version=0, chosen_item=slate[pos], chosen_position=pos,
            reward=REWARDS[slate[pos]], next_state=UserView(observation=[]), done=True,
            served_ts=float(t), outcome_ts=float(t)))
    return out


def policy_probs(agent, catalogue: ItemCatalogue) -> np.ndarray:
    """π over the 10 items for the (stateless) toy's only state."""
    state = StateBatch(torch.zeros(1, 0), torch.full((1, 1), -1),
                       torch.zeros(1, 1, dtype=torch.bool))
    with torch.no_grad():
        s_1D = agent.net.state.encode(state)
        logits = agent.net.logits(s_1D, torch.arange(N_ITEMS)[None],
                                  torch.from_numpy(catalogue.features(np.arange(N_ITEMS)))[None])
    return torch.softmax(logits[0].double(), -1).numpy()


def train(mode: str, topk: bool, n: int, seed: int = 0) -> np.ndarray:
    """The agent's π, averaged over the last ``AVERAGED`` calls, after ``n`` transitions."""
    candidates, overrides = MODES[mode]
    spec = WorldSpec(n_items=N_ITEMS, user_obs_dim=0, item_feature_dim=F, slate_size=K,
                     num_candidates=N_ITEMS if candidates else 0, history_len=1)
    catalogue = ItemCatalogue(np.random.default_rng(seed).normal(size=(N_ITEMS, F)))
    agent = registry.make_agent("reinforce", spec, seed, catalogue=catalogue,
                                topk_correction=topk, **TRAINING, **overrides)
    stream, seen = logged(spec, n, np.random.default_rng(seed + 1)), []
    for first in range(0, n, CALL):
        agent.learn_many(stream[first:first + CALL])
        seen.append(policy_probs(agent, catalogue))
    assert agent.updates >= n // TRAINING["update_every"] - CALL  # it learned all the way
    return np.mean(seen[-AVERAGED:], axis=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_topk_correction_reaches_the_papers_fixed_point(mode):
    pi = train(mode, topk=True, n=8192)
    assert pi[:2] == pytest.approx(FIXED_POINT, abs=0.03), pi.round(3)
    assert pi[2:].sum() < 0.01, pi.round(3)


@pytest.mark.parametrize("mode", list(MODES))
def test_standard_correction_puts_the_mass_on_item_one(mode):
    pi = train(mode, topk=False, n=4096)
    assert pi[0] > 0.95, pi.round(3)
