"""The agent contract as types (``learner.contract``): the Agent protocol, the typed metrics
records, the shared actor-critic config, ``AGENT`` in every module, one random stream each,
and the checks ``recommend`` makes once for every algorithm."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from recloop.core.catalogue import ItemCatalogue
from recloop.core.ports import Candidates
from recloop.learner import registry
from recloop.learner.actor_critic import ActorCriticConfig
from recloop.learner.contract import Agent, Metrics
from tests.unit.learner.synth import SPEC, make_catalogue, make_request, make_transitions

torch.set_num_threads(1)
NAMES = registry.names()

# Metric names are what snapshot manifests and dashboards already hold.
METRIC_NAMES = {
    "mf": ["bpr_loss", "pair_accuracy", "pairs", "updates"],
    "wolpertinger": ["critic_loss", "actor_loss", "q_mean", "target_mean", "manifold_dist",
                     "updates"],
    "drr": ["critic_loss", "actor_loss", "q_mean", "target_mean", "td_abs", "updates"],
    "reinforce": ["pg_loss", "beta_nll", "mean_weight", "mean_pi", "rewarded", "updates"],
    "slateq": ["q_loss", "choice_nll", "mean_q", "mean_target", "td_rows", "updates"],
    "slateq_myopic": ["q_loss", "choice_nll", "mean_q", "mean_target", "td_rows", "updates"],
}

# Config field names and defaults as written snapshots' manifests hold them.
SHARED_DEFAULTS = {"batch_size": 64, "replay_capacity": 50_000, "update_every": 1,
                   "learning_starts": 64, "snapshot_replay": False, "dim": 16,
                   "hidden": (64, 64), "actor_lr": 1e-3, "critic_lr": 1e-3, "gamma": 0.9,
                   "tau": 0.01, "epsilon": 0.1, "grad_clip": 10.0}
CONFIG_DEFAULTS = {
    "drr": {**SHARED_DEFAULTS, "state_rep": "ave", "per_alpha": 0.6, "per_beta": 0.4},
    "wolpertinger": {**SHARED_DEFAULTS, "history_mode": "mean", "knn_k": 10, "metric": "ip",
                     "manifold_coef": 0.1},
}


CAT = make_catalogue(SPEC)


def _agent(name: str, seed: int = 0) -> Agent:
    return registry.make_agent(name, SPEC, seed, catalogue=CAT, batch_size=8, learning_starts=8)


@pytest.mark.parametrize("name", NAMES)
def test_every_agent_meets_the_protocol_and_names_its_policy(name):
    agent = _agent(name)
    assert isinstance(agent, Agent)
    assert agent.name == agent.policy().name == name


@pytest.mark.parametrize("name", NAMES)
def test_metrics_are_a_typed_record_with_the_manifest_names(name):
    metrics = _agent(name).learn_many(make_transitions(n=40))
    assert isinstance(metrics, Metrics) and type(metrics) is not Metrics
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.updates = 0.0  # type: ignore[misc]
    values = metrics.as_dict()
    assert list(values) == METRIC_NAMES[name]
    assert values["updates"] == metrics.updates > 0


@pytest.mark.parametrize("name", sorted(CONFIG_DEFAULTS))
def test_actor_critics_share_one_config_base_with_unchanged_fields(name):
    config = registry.make_config(name)
    assert isinstance(config, ActorCriticConfig)
    assert dataclasses.asdict(config) == CONFIG_DEFAULTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_registry_builds_the_class_the_module_names(name, monkeypatch):
    mod = registry.module(name)

    class Renamed(mod.AGENT):  # no "Agent" suffix: only the explicit name can find it
        pass

    monkeypatch.setattr(mod, "AGENT", Renamed)
    assert type(registry.make_agent(name, SPEC, 0)) is Renamed
    monkeypatch.delattr(mod, "AGENT")
    with pytest.raises(TypeError, match="AGENT"):
        registry.make_agent(name, SPEC, 0)


def test_each_algorithm_explores_on_a_stream_of_its_own():
    policies = {name: _agent(name, seed=0).policy() for name in NAMES}
    streams = {name: p.stream for name, p in policies.items()}
    assert len(set(streams.values())) == len(NAMES), streams
    for name, policy in policies.items():
        mod = registry.module(name)
        expected = (mod.MYOPIC_EXPLORATION_STREAM if name == "slateq_myopic"
                    else mod.EXPLORATION_STREAM)
        assert policy.stream == expected, name
    # The same seed gives each algorithm different exploration draws.
    firsts = {p.rng.random() for p in policies.values()}
    assert len(firsts) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recommend_refuses_a_slate_size_the_candidates_cannot_fill(name):
    policy = _agent(name).policy()
    obs, cands = make_request()
    for k in (0, len(cands) + 1):
        with pytest.raises(ValueError, match=f"k={k}"):
            policy.recommend(obs, cands, k)
    empty = Candidates(np.zeros(0, np.int64), np.zeros((0, SPEC.item_feature_dim), np.float32))
    with pytest.raises(ValueError, match=f"k={SPEC.n_items + 1}"):
        policy.recommend(obs, empty, SPEC.n_items + 1)
    assert len(policy.recommend(obs, cands, len(cands)).items) == len(cands)


@pytest.mark.parametrize("name", NAMES)
def test_a_featured_world_without_catalogue_is_never_ranked_on_zeros(name):
    """Built without a catalogue, an agent still serves requests that carry their features,
    but refuses to rank a request without candidates (it holds no features for it) instead
    of ranking the catalogue on zeros; a catalogue of another width is refused outright."""
    agent = registry.make_agent(name, SPEC, 0, batch_size=8, learning_starts=8)
    assert agent.catalogue is None
    policy = agent.policy()
    obs, cands = make_request(catalogue=CAT)
    assert len(policy.recommend(obs, cands, SPEC.slate_size).items) == SPEC.slate_size
    empty = Candidates(np.zeros(0, np.int64), np.zeros((0, SPEC.item_feature_dim), np.float32))
    with pytest.raises(ValueError, match="catalogue"):
        policy.recommend(obs, empty, SPEC.slate_size)
    with pytest.raises(ValueError, match="item features"):
        agent.set_catalogue(ItemCatalogue(np.zeros((SPEC.n_items, SPEC.item_feature_dim + 1))))
    agent.set_catalogue(CAT)
    assert agent.catalogue is CAT
    assert len(policy.recommend(obs, empty, SPEC.slate_size).items) == SPEC.slate_size
