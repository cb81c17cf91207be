"""Learning over a whole catalogue (issue 13, item 4): a world whose requests name no
candidates, as the ``large_catalogue`` preset and every real deployment.

Before issue 13 a learner looked a slate item's features up among the request's candidates,
so without any it trained on zeros while serving ranked with the catalogue's real features:
the item-feature weights of SlateQ and DRR never moved (MF's only by weight decay), and
SlateQ without an id embedding gave every item the same value. Here, for every algorithm
but REINFORCE (``test_topk_agent.py`` covers it), through ``learn_many``:

(a) the features each update trains on are the catalogue's rows of the same ids, which are
    the rows its policy ranks a request without candidates with;
(b) the item-feature weights moved away from where Adam's weight decay alone takes them;
(c) SlateQ values differ across items, with and without an id embedding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from recloop.core.catalogue import ItemCatalogue
from recloop.core.ports import Candidates, Observation
from recloop.core.spec import WorldSpec
from recloop.learner import registry
from recloop.learner.agent import NoCatalogueError
from recloop.learner.batch import TransitionBatch
from tests.unit.learner.synth import make_catalogue, make_transitions

torch.set_num_threads(1)

# A small large_catalogue: many items, no candidate list, features on every item.
SPEC = WorldSpec(n_items=300, user_obs_dim=4, item_feature_dim=4, slate_size=3,
                 num_candidates=0, history_len=5)
CAT = make_catalogue(SPEC, seed=3)
NAMES = ["slateq", "slateq_myopic", "drr", "wolpertinger", "mf"]
SMALL = {"batch_size": 16, "learning_starts": 16}


def _feature_weights(name: str, agent) -> dict[str, nn.Parameter]:
    """The parameters through which each algorithm reads an item's features."""
    if name.startswith("slateq"):
        return {"q.net[0]": agent.q.net[0].weight, "choice.bilinear": agent.choice.bilinear,
                "choice.item_bias[0]": agent.choice.item_bias[0].weight}
    tower = {"drr": lambda: agent.net.rep.items, "wolpertinger": lambda: agent.net.items,
             "mf": lambda: agent.net.item}[name]()
    return {"item_tower.features": tower.features.weight}


def _feature_columns(name: str, key: str, w: torch.Tensor) -> torch.Tensor:
    """Only the feature part of Q̄'s first layer (its other inputs are the observation)."""
    if key == "q.net[0]":
        return w[:, SPEC.user_obs_dim : SPEC.user_obs_dim + SPEC.item_feature_dim]
    return w


def _optimiser_of(agent, p: nn.Parameter) -> torch.optim.Optimizer:
    for value in vars(agent).values():
        if isinstance(value, torch.optim.Optimizer) and any(
                q is p for g in value.param_groups for q in g["params"]):
            return value
    raise AssertionError("parameter in no optimiser")


def _decay_only(agent, p: nn.Parameter, p0: torch.Tensor) -> torch.Tensor:
    """Where ``p`` would be from ``p0`` after the same Adam steps with no data gradient (only
    the optimiser's weight decay; none at all for the algorithms without it)."""
    opt = _optimiser_of(agent, p)
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    steps = int(opt.state[p]["step"])
    ref = p0.clone().requires_grad_(True)
    ref_opt = torch.optim.Adam([ref], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                               weight_decay=group["weight_decay"])
    for _ in range(steps):
        ref.grad = torch.zeros_like(ref)
        ref_opt.step()
    return ref.detach()


def _trained(name: str, monkeypatch, **over):
    """An agent trained through learn_many on 160 whole-catalogue transitions, the batches
    its updates trained on, and its feature weights before training."""
    agent = registry.make_agent(name, SPEC, 0, catalogue=CAT, **SMALL, **over)
    before = {k: p.detach().clone() for k, p in _feature_weights(name, agent).items()}
    batches: list[TransitionBatch] = []
    build = agent._batch

    def spy(transitions):
        batch = build(transitions)
        batches.append(batch)
        return batch

    monkeypatch.setattr(agent, "_batch", spy)
    transitions = make_transitions(SPEC, n=160, seed=1, catalogue=CAT)
    assert all(t.candidates == [] for t in transitions)  # no candidate list anywhere
    agent.learn_many(transitions)
    assert agent.updates > 10 and len(batches) == agent.updates
    return agent, batches, before


@pytest.mark.parametrize("name", NAMES)
def test_trains_on_the_features_serving_ranks_with(name, monkeypatch):
    agent, batches, _ = _trained(name, monkeypatch)
    policy = agent.policy()
    for batch in batches:
        for ids, feats in ((batch.slate_BK, batch.slate_features_BKF),
                           (batch.next_slate_BK, batch.next_slate_features_BKF)):
            real = ids >= 0
            assert real.any()
            served = policy.item_features(ids[real].numpy())  # what ranking the ids reads
            np.testing.assert_array_equal(feats[real].numpy(), served)
            np.testing.assert_array_equal(served, CAT.features(ids[real].numpy()))
            assert np.abs(served).sum() > 0
    every = np.arange(SPEC.n_items)
    np.testing.assert_array_equal(policy.item_features(every), CAT.features_NF)
    # And a request without candidates is answered from the whole catalogue.
    obs = Observation("u", np.ones(SPEC.user_obs_dim, np.float32), history=(4, 9))
    empty = Candidates(np.zeros(0, np.int64), np.zeros((0, SPEC.item_feature_dim), np.float32))
    slate = policy.recommend(obs, empty, SPEC.slate_size)
    assert len(set(slate.items.tolist())) == SPEC.slate_size


@pytest.mark.parametrize("name", NAMES)
def test_item_feature_weights_move_by_more_than_weight_decay(name, monkeypatch):
    agent, _, before = _trained(name, monkeypatch)
    for key, p in _feature_weights(name, agent).items():
        ref = _decay_only(agent, p, before[key])
        moved = (_feature_columns(name, key, p.detach())
                 - _feature_columns(name, key, ref)).abs().max().item()
        assert moved > 1e-2, (name, key, moved)


@pytest.mark.parametrize("item_id_dim", [None, 0], ids=["default", "no-id-embedding"])
def test_slateq_values_differ_across_items(item_id_dim, monkeypatch):
    agent, _, _ = _trained("slateq", monkeypatch, item_id_dim=item_id_dim)
    assert (agent.q.ids is not None) == (item_id_dim is None)  # on by default without candidates
    policy = agent.policy()
    ids_N = np.arange(SPEC.n_items)
    with torch.no_grad():
        obs_1U = torch.ones(1, SPEC.user_obs_dim)
        feats_1NF = torch.from_numpy(policy.item_features(ids_N))[None]
        q_N = agent.q(obs_1U, torch.from_numpy(ids_N)[None], feats_1NF)[0]
        v_N = agent.choice(obs_1U, torch.from_numpy(ids_N)[None], feats_1NF)[0][0]
    assert len(set(np.round(q_N.numpy(), 6))) > SPEC.n_items // 2
    assert q_N.std().item() > 1e-3 and v_N.std().item() > 1e-3


def test_slateq_refuses_items_it_could_not_tell_apart():
    id_only = WorldSpec(n_items=50, user_obs_dim=2, item_feature_dim=0, slate_size=2,
                        num_candidates=0)
    assert registry.make_agent("slateq", id_only, 0).q.ids is not None  # the default has ids
    with pytest.raises(ValueError, match="item id embedding"):
        registry.make_agent("slateq", id_only, 0, item_id_dim=0)


@pytest.mark.parametrize("name", NAMES)
def test_no_catalogue_no_learning_on_zeros(name):
    agent = registry.make_agent(name, SPEC, 0, **SMALL)  # built without: allowed
    with pytest.raises(NoCatalogueError, match="catalogue"):
        agent.learn_many(make_transitions(SPEC, n=40, seed=1, catalogue=CAT))


@pytest.mark.parametrize("name", NAMES)
def test_a_new_catalogue_version_is_what_the_policy_ranks_with(name):
    agent = registry.make_agent(name, SPEC, 0, catalogue=CAT, **SMALL)
    every = np.arange(SPEC.n_items)
    obs = Observation("u", np.ones(SPEC.user_obs_dim, np.float32))
    empty = Candidates(np.zeros(0, np.int64), np.zeros((0, SPEC.item_feature_dim), np.float32))
    agent.policy().recommend(obs, empty, SPEC.slate_size)  # warms any cache or index
    newer = ItemCatalogue(-CAT.features_NF, version=2)
    agent.set_catalogue(newer)
    np.testing.assert_array_equal(agent.policy().item_features(every), newer.features_NF)
    agent.learn_many(make_transitions(SPEC, n=40, seed=2, catalogue=newer))
    assert agent.updates > 0
