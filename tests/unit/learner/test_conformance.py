"""One conformance suite for every registered algorithm (River's check_estimator idea).

Parametrised over ``registry.names()``: an algorithm whose module does not exist yet fails
here with ImportError rather than being skipped.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from recloop.learner import registry
from recloop.learner.batch import to_batch
from recloop.learner.contract import Metrics
from tests.unit.learner.synth import SPEC, make_catalogue, make_request, make_transitions

torch.set_num_threads(1)
NAMES = registry.names()
SMALL = {"batch_size": 8, "learning_starts": 8}
CAT = make_catalogue(SPEC)


def _agent(name: str, seed: int = 0):
    return registry.make_agent(name, SPEC, seed, catalogue=CAT, **_small(name))


def _fields(name: str) -> set[str]:
    try:
        return {f.name for f in dataclasses.fields(registry.module(name).Config)}
    except ImportError:
        return set()  # the module is missing: the tests that use it fail with ImportError


def _small(name: str) -> dict:
    fields = _fields(name)
    return {k: v for k, v in SMALL.items() if k in fields}


def _slate_of(policy, seed: int = 0):
    obs, cands = make_request(seed=seed, catalogue=CAT)  # featured as serving features them
    return policy.recommend(obs, cands, SPEC.slate_size), cands


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [1, 64])
def test_update_returns_finite_metrics_and_leaves_batch_alone(name, size):
    agent = _agent(name)
    batch = to_batch(make_transitions(n=size, seed=size), SPEC, CAT)
    before = batch.clone()
    for _ in range(3):
        metrics = agent.update(batch)
        assert isinstance(metrics, Metrics) and dataclasses.is_dataclass(metrics)
        values = metrics.as_dict()
        assert values and all(isinstance(v, float) and math.isfinite(v) for v in values.values())
        assert list(values) == [f.name for f in dataclasses.fields(metrics)]
    for field in before.__dataclass_fields__:
        assert torch.equal(getattr(before, field), getattr(batch, field)), field


@pytest.mark.parametrize("name", NAMES)
def test_learn_many_counts_and_returns_finite_metrics(name):
    agent = _agent(name)
    metrics = agent.learn_many(make_transitions(n=40))
    assert agent.transitions_applied == 40
    assert metrics is not None and metrics.updates == agent.updates > 0
    assert all(math.isfinite(v) for v in metrics.as_dict().values())


@pytest.mark.parametrize("name", NAMES)
def test_learn_many_returns_none_while_no_update_is_due(name):
    agent = _agent(name)
    assert agent.learn_many(make_transitions(n=2)) is None  # below learning_starts
    assert agent.updates == 0 and agent.transitions_applied == 2


@pytest.mark.parametrize("name", NAMES)
def test_snapshot_round_trip_is_exact(name):
    agent = _agent(name)
    agent.learn_many(make_transitions(n=40, seed=1))
    tensors = agent.state_tensors()
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    clone = _agent(name, seed=99)  # different init: everything must come from the snapshot
    clone.load_state_tensors(tensors)
    a, _ = _slate_of(agent.policy(), 3)
    b, _ = _slate_of(clone.policy(), 3)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.propensities, b.propensities)
    batch = to_batch(make_transitions(n=16, seed=2), SPEC, CAT)
    assert agent.update(batch) == clone.update(batch)
    after_a, after_b = agent.state_tensors(), clone.state_tensors()
    assert after_a.keys() == after_b.keys()
    for key in after_a:
        if not key.startswith("replay."):  # replay contents are opt-in (snapshot_replay)
            np.testing.assert_array_equal(after_a[key], after_b[key], err_msg=key)
    # Serving's path: an inference-only policy from the snapshot answers identically.
    manifest = {"config": agent.config_dict(), "version": 3}
    served = registry.load_policy(name, agent.state_tensors(), manifest, SPEC)
    assert served.version == 3
    served.explore = agent.policy().explore = False
    c, _ = _slate_of(served, 5)
    d, _ = _slate_of(agent.policy(), 5)
    np.testing.assert_array_equal(c.items, d.items)
    np.testing.assert_allclose(c.scores, d.scores)


WITH_REPLAY = [n for n in NAMES if "snapshot_replay" in _fields(n)]


@pytest.mark.parametrize("name", WITH_REPLAY)
def test_resumed_learner_continues_identically(name):
    """With the replay in the snapshot, learn_many after a restore matches the original."""
    agent = registry.make_agent(name, SPEC, 0, catalogue=CAT, snapshot_replay=True,
                                **_small(name))
    agent.learn_many(make_transitions(n=30, seed=1))
    clone = registry.make_agent(name, SPEC, 5, catalogue=CAT, snapshot_replay=True,
                                **_small(name))
    clone.load_state_tensors(agent.state_tensors())
    more = make_transitions(n=30, seed=2)
    assert agent.learn_many(more) == clone.learn_many(more)
    a, b = agent.state_tensors(), clone.state_tensors()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_determinism(name):
    runs = []
    for _ in range(2):
        agent = _agent(name, seed=7)
        metrics = agent.learn_many(make_transitions(n=48, seed=4))
        slates = [_slate_of(agent.policy(), s)[0].items.tolist() for s in range(5)]
        runs.append((metrics, slates, agent.state_tensors()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    for key in runs[0][2]:
        np.testing.assert_array_equal(runs[0][2][key], runs[1][2][key], err_msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_slates_are_k_distinct_candidates_with_valid_propensities(name):
    agent = _agent(name)
    agent.learn_many(make_transitions(n=40))
    policy = agent.policy()
    for seed in range(20):
        slate, cands = _slate_of(policy, seed)
        items = slate.items.tolist()
        assert len(items) == SPEC.slate_size == len(set(items))
        assert set(items) <= set(cands.ids.tolist())
        assert slate.items.dtype == np.int64
        assert slate.scores.shape == slate.propensities.shape == (SPEC.slate_size,)
        assert np.all((slate.propensities >= 0) & (slate.propensities <= 1))
        assert np.all(slate.propensities > 0)  # an item that was served had a chance


@pytest.mark.parametrize("name", NAMES)
def test_propensities_match_empirical_inclusion_frequencies(name):
    """Propensities are consistent with how slates are drawn: for a fixed request, the
    average logged propensity of an item (over the draws that served it) is its empirical
    inclusion frequency."""
    policy = _agent(name).policy()
    obs, cands = make_request(seed=11, catalogue=CAT)
    draws = 3000
    count, prop_sum = {}, {}
    for _ in range(draws):
        slate = policy.recommend(obs, cands, SPEC.slate_size)
        for item, p in zip(slate.items.tolist(), slate.propensities.tolist(), strict=True):
            count[item] = count.get(item, 0) + 1
            prop_sum[item] = prop_sum.get(item, 0.0) + p
    for item, c in count.items():
        freq, logged = c / draws, prop_sum[item] / c
        assert abs(freq - logged) < 4 * math.sqrt(max(logged * (1 - logged), 1e-4) / draws) + 1e-3, (
            item, freq, logged)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_serving_has_propensity_one(name):
    policy = _agent(name).policy()
    policy.explore = False
    slate, _ = _slate_of(policy)
    np.testing.assert_array_equal(slate.propensities, np.ones(SPEC.slate_size))


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="known: mf"):
        registry.make_agent("nope", SPEC, 0)
