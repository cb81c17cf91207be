"""Learning in the in-process loop (producer_sim runner -> streams fold -> learner -> policy).

Figures are evaluation episodes with learning and exploration off, on a fixed evaluation seed
shared by every policy (common random numbers: the same users, candidates and click draws
until the policies' choices diverge), reported with 95% confidence intervals.
"""

from __future__ import annotations

import pytest
import torch

from learner import registry
from producer_sim.policies import RandomPolicy
from producer_sim.presets import interest_evolution, tiny_world
from recloop.inprocess import evaluate, spec_for, train

torch.set_num_threads(1)

TINY_TRAIN, TINY_EVAL = 120, 200
IE_TRAIN, IE_EVAL = 100, 300
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


@pytest.mark.slow
def test_sarsa_ts_beats_myop_ts_and_both_beat_random_on_interest_evolution():
    world = interest_evolution()
    random_report = evaluate(world, RandomPolicy(seed=3), IE_EVAL, seed=77)
    reports = {}
    for name in ("slateq", "slateq_myopic"):
        agent = registry.make_agent(name, spec_for(world), seed=0, **IE_OVERRIDES)
        train(world, agent, IE_TRAIN, seed=1)
        reports[name] = evaluate(world, agent.policy(), IE_EVAL, seed=77)
    sarsa, myop, rand = (reports["slateq"].mean_return, reports["slateq_myopic"].mean_return,
                         random_report.mean_return)
    print(f"\ninterest_evolution, {IE_EVAL} evaluation episodes (mean ± 95% CI):"
          f"\n  SARSA-TS {sarsa}\n  MYOP-TS  {myop}\n  random   {rand}")
    assert myop.mean - myop.ci95 > rand.mean + rand.ci95
    assert sarsa.mean - sarsa.ci95 > rand.mean + rand.ci95
    assert sarsa.mean > myop.mean
