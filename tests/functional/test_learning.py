"""Learning in the in-process loop (producer_sim runner -> streams fold -> learner -> policy).

Figures are evaluation episodes with learning and exploration off. Every comparison uses
common random numbers (``evaluate_paired``): evaluation episode e is the same user, with the
same candidate sets and click draws, for every policy, so policies are compared by the 95% CI
of their per-episode (paired) difference in return. Each trained agent is compared with
itself untrained (a copy taken before training), so a test fails if learning is switched off
even where an untrained network happens to beat uniform random.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recloop.inprocess import PairedReport, evaluate_paired, spec_for, train
from recloop.learner import registry
from recloop.learner.batch import to_batch
from recloop.producer_sim.policies import RandomPolicy
from recloop.producer_sim.presets import interest_evolution, tiny_world
from recloop.producer_sim.runner import Estimate
from tests.unit.learner.synth import SPEC, make_catalogue, make_transitions

torch.set_num_threads(1)

TINY_TRAIN, TINY_EVAL = 120, 200
# Every agent is compared with itself untrained: a deep copy taken before training, so the same
# weights and random streams, evaluated on the same users (evaluate_paired). Seed 1: at seed 0
# Wolpertinger's untrained critic already ranks a loved item first for both kinds of user
# (5.75 of 6.67) and 120 sessions do not move its greedy slates, so the comparison there
# could not tell learning from none.
AGENT_SEED = 1
# SARSA-TS (γ = 0.99) and MYOP-TS (γ = 0) each learn online for IE_TRAIN sessions, then every
# policy serves the same IE_EVAL evaluation users.
IE_TRAIN, IE_EVAL = 100, 200
IE_OVERRIDES = {"choice_model": "proportional", "update_every": 4}


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.names())
def test_every_algorithm_learns_to_beat_itself_untrained_and_uniform_random_on_tiny_world(name):
    world = tiny_world()
    agent = registry.make_agent(name, spec_for(world), seed=AGENT_SEED,
                                catalogue=world.item_catalogue)
    untrained = copy.deepcopy(agent)
    trained = train(world, agent, TINY_TRAIN, seed=1)
    assert trained.transitions > 0.9 * TINY_TRAIN * 10  # ten steps per session
    policies = {name: agent.policy(), "untrained": untrained.policy(),
                "random": RandomPolicy(seed=3)}  # fmt: skip
    paired = evaluate_paired(world, policies, TINY_EVAL, seed=99)
    print(f"\n{name} on tiny_world, {TINY_TRAIN} training sessions:\n{paired.table()}")
    for baseline in ("untrained", "random"):
        diff = paired.difference(name, baseline)
        assert diff.mean - diff.ci95 > 0, f"{name} - {baseline} = {diff}: 95% CI not above 0"


def test_slateq_sarsa_target_uses_the_target_network_on_the_next_state_and_served_slate():
    """y = r + γ (1 - done) [Σ_{j∈A'} P(j|s',A') Q̄'(s',j) + P(⊥|s',A') Q̄'(s',⊥)], recomputed
    here from the raw transitions with the target network, which is made to differ from the
    online one so that using Q̄ instead of Q̄', or s instead of s', would show."""
    catalogue = make_catalogue(SPEC)
    agent = registry.make_agent("slateq", SPEC, seed=0, gamma=0.7, catalogue=catalogue)
    with torch.no_grad():
        for p in agent.q_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    transitions = make_transitions(n=24, seed=5)
    assert any(t.done for t in transitions) and any(not t.done for t in transitions)
    y_B, valid_B = agent.td_targets(to_batch(transitions, SPEC, catalogue))
    assert bool(valid_B.all())

    def expected(t, on_next_state: bool = True) -> float:
        if t.done:
            return t.reward
        view = t.next_state if on_next_state else t.state
        obs_1U = torch.tensor([view.observation], dtype=torch.float32)
        ids_1K = torch.tensor([t.next_slate])
        feats_1KF = torch.from_numpy(catalogue.features(np.array([t.next_slate])))
        with torch.no_grad():
            q_K = agent.q_target(obs_1U, ids_1K, feats_1KF)[0]
            v_1K, v_null_1 = agent.choice(obs_1U, ids_1K, feats_1KF)
            total = v_null_1[0] + v_1K[0].sum()
            value = (v_1K[0] / total * q_K).sum() + v_null_1[0] / total * (
                agent.q_target.null_value(obs_1U)[0])
        return t.reward + 0.7 * float(value)

    want_B = np.array([expected(t) for t in transitions])
    np.testing.assert_allclose(y_B.numpy(), want_B, rtol=1e-5, atol=1e-5)
    on_s_B = np.array([expected(t, on_next_state=False) for t in transitions])
    assert not np.allclose(y_B.numpy(), on_s_B, atol=1e-3)  # the check can tell s from s'


def _paired_ctr_difference(paired: PairedReport, a: str, b: str) -> Estimate:
    """Mean and 95% CI of CTR(a) - CTR(b), each episode's clicks over its steps, paired."""
    ra, rb = paired.reports[a], paired.reports[b]
    return Estimate.of(ra.clicks_E / ra.steps_E - rb.clicks_E / rb.steps_E)


@pytest.mark.slow
def test_sarsa_ts_beats_myop_ts_and_both_beat_random_on_interest_evolution():
    """SARSA-TS learns return: it beats MYOP-TS, random and itself untrained. MYOP-TS (γ = 0)
    learns what it optimises, the next click: its CTR beats its untrained self's, while its
    return need not (clicks on low-quality items spend the budget, the paper's point)."""
    world = interest_evolution()
    policies = {}
    for name in ("slateq", "slateq_myopic"):
        agent = registry.make_agent(name, spec_for(world), seed=0,
                                    catalogue=world.item_catalogue, **IE_OVERRIDES)
        policies[f"{name} untrained"] = copy.deepcopy(agent).policy()
        train(world, agent, IE_TRAIN, seed=1)
        policies[name] = agent.policy()
    policies["random"] = RandomPolicy(seed=3)
    paired = evaluate_paired(world, policies, IE_EVAL, seed=77)
    pairs = [("slateq", "slateq_myopic"), ("slateq", "random"), ("slateq_myopic", "random"),
             ("slateq", "slateq untrained")]  # fmt: skip
    myopic_ctr = _paired_ctr_difference(paired, "slateq_myopic", "slateq_myopic untrained")
    print(f"\ninterest_evolution (10 candidates, slate 3), {IE_TRAIN} training sessions, "
          f"{IE_EVAL} paired evaluation users:\n{paired.table(pairs)}\n"
          f"  CTR of slateq_myopic - slateq_myopic untrained: {myopic_ctr}")
    for a, b in pairs:
        diff = paired.difference(a, b)
        assert diff.mean - diff.ci95 > 0, f"{a} - {b} = {diff}: 95% CI not above 0"
    assert myopic_ctr.mean - myopic_ctr.ci95 > 0, f"MYOP-TS CTR gain {myopic_ctr}"
