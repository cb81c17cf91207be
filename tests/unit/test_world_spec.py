"""One WorldSpec: the simulator's world and the learner's view of it are the same record."""

from __future__ import annotations

import pytest

from recloop.core.spec import WorldSpec
from recloop.producer_sim.presets import interest_evolution
from recloop.worlds import learner_spec


def test_the_learner_spec_is_the_worlds_spec_with_the_learners_history_length():
    world = interest_evolution(seed=0)
    assert isinstance(world.spec, WorldSpec)
    spec = learner_spec("interest_evolution", seed=0, history_len=7)
    assert spec.history_len == 7
    assert world.spec.history_len == WorldSpec.__dataclass_fields__["history_len"].default
    sizes = ("n_items", "user_obs_dim", "item_feature_dim", "slate_size", "num_candidates")
    assert [getattr(spec, f) for f in sizes] == [getattr(world.spec, f) for f in sizes]


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
