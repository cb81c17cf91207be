"""Learning in the in-process loop (producer_sim runner -> streams fold -> learner -> policy).

Figures are evaluation episodes with learning and exploration off, reported with 95%
confidence intervals. The interest-evolution comparison uses common random numbers
(``evaluate_paired``): evaluation episode e is the same user, with the same candidate sets and
click draws, for every policy, so policies are compared by the 95% CI of their per-episode
(paired) difference in return.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recloop.inprocess import evaluate, evaluate_paired, spec_for, train
from recloop.learner import registry
from recloop.learner.batch import to_batch
from recloop.producer_sim.policies import RandomPolicy
from recloop.producer_sim.presets import interest_evolution, tiny_world
from tests.unit.learner.synth import SPEC, make_transitions

torch.set_num_threads(1)

TINY_TRAIN, TINY_EVAL = 120, 200
# SARSA-TS (γ = 0.99) and MYOP-TS (γ = 0) each learn online for IE_TRAIN sessions, then every
# policy serves the same IE_EVAL evaluation users.
IE_TRAIN, IE_EVAL = 100, 200
IE_OVERRIDES = {"choice_model": "proportional", "update_every": 4}


@pytest.fixture(scope="module")
def tiny():
    world = tiny_world()
    return world, evaluate(world, RandomPolicy(seed=3), TINY_EVAL, seed=99)


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.names())
def test_every_algorithm_beats_uniform_random_on_tiny_world(name, tiny):
    world, random_report = tiny
    agent = registry.make_agent(name, spec_for(world), seed=0)
    trained = train(world, agent, TINY_TRAIN, seed=1)
    assert trained.transitions > 0.9 * TINY_TRAIN * 10  # ten steps per session
    report = evaluate(world, agent.policy(), TINY_EVAL, seed=99)
    learned, rand = report.mean_return, random_report.mean_return
    print(f"\n{name}: {learned} vs random {rand} ({TINY_EVAL} episodes)")
    assert learned.mean - learned.ci95 > rand.mean + rand.ci95


def test_slateq_sarsa_target_uses_the_target_network_on_the_next_state_and_served_slate():
    """y = r + γ (1 - done) [Σ_{j∈A'} P(j|s',A') Q̄'(s',j) + P(⊥|s',A') Q̄'(s',⊥)], recomputed
    here from the raw transitions with the target network, which is made to differ from the
    online one so that using Q̄ instead of Q̄', or s instead of s', would show."""
    agent = registry.make_agent("slateq", SPEC, seed=0, gamma=0.7)
    with torch.no_grad():
        for p in agent.q_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    transitions = make_transitions(n=24, seed=5)
    assert any(t.done for t in transitions) and any(not t.done for t in transitions)
    y_B, valid_B = agent.td_targets(to_batch(transitions, SPEC))
    assert bool(valid_B.all())

    def expected(t, on_next_state: bool = True) -> float:
        if t.done:
            return t.reward
        view = t.next_state if on_next_state else t.state
        obs_1U = torch.tensor([view.observation], dtype=torch.float32)
        feats = dict(zip(t.next_candidates, t.next_candidate_features, strict=True))
        ids_1K = torch.tensor([t.next_slate])
        feats_1KF = torch.tensor([[feats[i] for i in t.next_slate]], dtype=torch.float32)
        with torch.no_grad():
            q_K = agent.q_target(obs_1U, ids_1K, feats_1KF)[0]
            v_1K, v_null_1 = agent.choice(obs_1U, feats_1KF)
            total = v_null_1[0] + v_1K[0].sum()
            value = (v_1K[0] / total * q_K).sum() + v_null_1[0] / total * (
                agent.q_target.null_value(obs_1U)[0])
        return t.reward + 0.7 * float(value)

    want_B = np.array([expected(t) for t in transitions])
    np.testing.assert_allclose(y_B.numpy(), want_B, rtol=1e-5, atol=1e-5)
    on_s_B = np.array([expected(t, on_next_state=False) for t in transitions])
    assert not np.allclose(y_B.numpy(), on_s_B, atol=1e-3)  # the check can tell s from s'


@pytest.mark.slow
def test_sarsa_ts_beats_myop_ts_and_both_beat_random_on_interest_evolution():
    world = interest_evolution()
    policies = {}
    for name in ("slateq", "slateq_myopic"):
        agent = registry.make_agent(name, spec_for(world), seed=0, **IE_OVERRIDES)
        train(world, agent, IE_TRAIN, seed=1)
        policies[name] = agent.policy()
    policies["random"] = RandomPolicy(seed=3)
    paired = evaluate_paired(world, policies, IE_EVAL, seed=77)
    pairs = [("slateq", "slateq_myopic"), ("slateq", "random"), ("slateq_myopic", "random")]
    print(f"\ninterest_evolution (10 candidates, slate 3), {IE_TRAIN} training sessions, "
          f"{IE_EVAL} paired evaluation users:\n{paired.table(pairs)}")
    for a, b in pairs:
        diff = paired.difference(a, b)
        assert diff.mean - diff.ci95 > 0, f"{a} - {b} = {diff}: 95% CI not above 0"
