"""The in-process loop runs the product's services: serving's split, fallback and
exploration are on its path, and its transitions are what the services make of the users."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from recloop.core import codec
from recloop.core.events import RecRequest, SlateServed, Transition
from recloop.inprocess import build_loop, spec_for
from recloop.learner import registry
from recloop.producer_sim.presets import make_world
from recloop.serving.split import TrafficSplit

EPISODES = 60


@pytest.fixture(scope="module")
def ab_run():
    world = make_world("tiny_world", seed=0)
    agent = registry.make_agent("slateq", spec_for(world), seed=0)
    split = TrafficSplit.parse(["slateq=0.7", "random=0.3"])
    loop = build_loop(world, {"slateq": agent}, EPISODES, seed=4, split=split,
                      fallback="uniform", serve_from_start=False, snapshot_every=100)  # fmt: skip
    loop.run()
    # In publish order (the memory bus stamps records with a publish counter).
    records = sorted(loop.bus.records(loop.sim.topics.slates), key=lambda m: m.timestamp_ms)
    slates = [codec.decode(m.value, SlateServed) for m in records]
    return world, agent, split, loop, slates


def test_every_user_is_served_whole_sessions_by_its_arm_of_the_split(ab_run) -> None:
    _, _, split, loop, slates = ab_run
    arms: dict[str, set[str]] = defaultdict(set)
    for slate in slates:
        arms[slate.user_id].add(slate.policy)
    assert len(arms) == EPISODES and loop.sim.stats.outcomes == EPISODES
    assert all(policies == {split.arm(user)} for user, policies in arms.items())
    on_learned = sum(split.arm(user) == "slateq" for user in arms)
    # Binomial(60, 0.7): mean 42, sd 3.5; four sd either side.
    assert abs(on_learned - 0.7 * EPISODES) <= 4 * math.sqrt(EPISODES * 0.7 * 0.3)
    assert 0 < on_learned < EPISODES


def test_the_fallback_serves_the_learned_arm_until_its_first_snapshot(ab_run) -> None:
    world, agent, _, loop, slates = ab_run
    learned = [s for s in slates if s.policy == "slateq"]
    versions = [s.policy_version for s in learned]
    first = versions.index(1)  # the learner's first announcement was installed
    assert first > 0 and set(versions[:first]) == {0}
    assert loop.serve.installer.counts["swapped"] == loop.learners[0].progress.version >= 2
    assert all(b >= a for a, b in zip(versions, versions[1:], strict=False))
    k = world.slate_size
    # The declared fallback (uniform) and the built-in random arm: K/N for every item.
    for slate in learned[:first] + [s for s in slates if s.policy == "random"]:
        assert np.allclose(slate.propensities, k / len(slate.candidates))
    # The learned policy's ε-greedy slate: (1-ε)·1[greedy] + ε·K/N, as the agent logs it.
    eps = agent.config.epsilon
    for slate in learned[first:]:
        uniform = eps * k / len(slate.candidates)
        for p in slate.propensities:
            assert math.isclose(p, uniform) or math.isclose(p, 1 - eps + uniform)
    assert any(not math.isclose(p, k / 6) for s in learned[first:] for p in s.propensities)


def test_every_served_slate_became_one_transition_learned_once(ab_run) -> None:
    _, _, _, loop, slates = ab_run
    transitions = [codec.decode(m.value, Transition)
                   for m in loop.bus.records(loop.sim.topics.transitions)]  # fmt: skip
    assert len(transitions) == len(slates) == loop.sim.stats.slates
    assert {t.request_id for t in transitions} == {s.request_id for s in slates}
    assert loop.learners[0].progress.transitions_applied == len(transitions)


def test_serving_explores_at_epsilon_with_honest_propensities() -> None:
    world = make_world("tiny_world", seed=0)
    agent = registry.make_agent("slateq", spec_for(world), seed=0)
    agent.policy().explore = False  # its slates are greedy: serving's ε mixes them
    loop = build_loop(world, {"slateq": agent}, 30, seed=5, epsilon=0.25)
    loop.run()
    k, n = world.slate_size, world.num_candidates
    stats = loop.serve.server.stats
    assert stats["branch_uniform"] > 0 and stats["branch_policy"] > 0
    props = {round(p, 9) for m in loop.bus.records(loop.sim.topics.slates)
             for p in codec.decode(m.value, SlateServed).propensities}  # fmt: skip
    # In the policy's slate: (1-ε) + εK/N; drawn by exploration outside it: εK/N.
    assert props <= {round(0.75 + 0.25 * k / n, 9), round(0.25 * k / n, 9)}
    assert round(0.75 + 0.25 * k / n, 9) in props


def test_the_catalogue_travels_on_the_bus_to_learner_and_serving() -> None:
    """No candidate list and no world handed over: the simulator publishes its catalogue,
    the learner's agent and serving take it off the bus and the slates come from it."""
    world = make_world("large_catalogue", seed=0, n_items=500, dim=8)
    agent = registry.make_agent("mf", spec_for(world), seed=0)
    assert agent.catalogue is None
    loop = build_loop(world, {"mf": agent}, 12, seed=6)
    loop.run()
    sha = world.item_catalogue.sha256
    assert agent.catalogue is not None and agent.catalogue.sha256 == sha
    assert loop.serve.server.served is not None
    assert loop.serve.server.served.catalogue.sha256 == sha
    requests = [codec.decode(m.value, RecRequest)
                for m in loop.bus.records(loop.sim.topics.requests)]  # fmt: skip
    assert requests and not any(r.candidates for r in requests)
    slates = [codec.decode(m.value, SlateServed) for m in loop.bus.records(loop.sim.topics.slates)]
    # Each slate names what serving retrieved from the catalogue for it, and ranks from those.
    assert all(len(s.items) == world.slate_size and set(s.items) <= set(s.candidates)
               and len(s.candidates) <= 100 for s in slates)  # fmt: skip
    assert loop.learners[0].progress.transitions_applied == len(slates)
