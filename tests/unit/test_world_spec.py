"""One WorldSpec: the simulator's world and the learner's view of it are the same record.

The learner no longer builds its sizes from a simulator preset: ``n_items`` and
``item_feature_dim`` are the catalogue's, the rest is read off the transitions the streams
fold makes (``services.learn.spec_from``). These tests fold each preset's own traffic and
check that what the learner reads is the world's spec.
"""

from __future__ import annotations

import dataclasses

import pytest

from recloop.core.events import (
    Click,
    Impression,
    Record,
    SessionEnd,
    SessionState,
    SlateServed,
    Transition,
)
from recloop.core.spec import WorldSpec
from recloop.producer_sim.policies import RandomPolicy
from recloop.producer_sim.presets import make_world
from recloop.producer_sim.runner import run_episodes
from recloop.producer_sim.world import World
from recloop.services.learn import spec_from
from recloop.streams import fold

WORLDS = {
    "interest_evolution": {"n_items": 500},
    "tiny_world": {},
    "large_catalogue": {"n_items": 2_000},
}


def world_transitions(world: World, episodes: int = 4, seed: int = 0) -> list[Transition]:
    """The transitions the streams fold makes of a random policy's ``episodes`` sessions."""
    states: dict[str, SessionState] = {}
    out: list[Transition] = []

    def sink(record: Record) -> None:
        if isinstance(record, SlateServed | Impression | Click | SessionEnd):
            state, transitions = fold.apply(states.get(record.user_id), record)
            states[record.user_id] = state
            out.extend(transitions)

    run_episodes(world, RandomPolicy(seed=seed), episodes=episodes, seed=seed, sink=sink,
                 users_in_parallel=min(episodes, 4))  # fmt: skip
    return out


@pytest.mark.parametrize("preset", sorted(WORLDS))
def test_the_learners_sizes_from_catalogue_and_stream_are_the_worlds_spec(preset):
    world = make_world(preset, seed=0, **WORLDS[preset])
    transitions = world_transitions(world)
    assert transitions
    spec = spec_from(world.item_catalogue, transitions, history_len=7)
    assert spec == dataclasses.replace(world.spec, history_len=7)
    assert world.spec.history_len == WorldSpec.__dataclass_fields__["history_len"].default


def test_sizes_need_a_transition():
    world = make_world("tiny_world")
    with pytest.raises(ValueError, match="at least one transition"):
        spec_from(world.item_catalogue, [])


def test_the_manifest_form_round_trips_and_ignores_keys_it_does_not_know():
    spec = WorldSpec(n_items=30, user_obs_dim=4, item_feature_dim=2, slate_size=3,
                     num_candidates=10, history_len=6)  # fmt: skip
    data = spec.to_dict()
    assert data == {"n_items": 30, "user_obs_dim": 4, "item_feature_dim": 2, "slate_size": 3,
                    "num_candidates": 10, "history_len": 6}  # fmt: skip
    assert WorldSpec.from_dict({**data, "grown_later": 1}) == spec
    assert WorldSpec.from_dict({k: str(v) for k, v in data.items()}) == spec  # JSON strings


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"n_items": 0}, "n_items >= 1"),
        ({"slate_size": 0}, "slate_size >= 1"),
        ({"user_obs_dim": -1}, "non-negative"),
        ({"history_len": 0}, "history_len must be >= 1"),
        ({"num_candidates": 2}, "num_candidates 2 < slate_size 3"),
    ],
)
def test_impossible_sizes_are_refused(sizes, message):
    base = {"n_items": 30, "user_obs_dim": 4, "item_feature_dim": 2, "slate_size": 3,
            "num_candidates": 10}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        WorldSpec(**{**base, **sizes})
