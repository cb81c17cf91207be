"""Wolpertinger: the paper's pipeline facts and a learning check on a tiny bandit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Transition, UserView
from recloop.core.ports import Candidates, Observation
from recloop.core.spec import WorldSpec
from recloop.learner import registry
from recloop.learner.algorithms import wolpertinger as W
from recloop.learner.batch import request_batch, to_batch
from tests.unit.learner.synth import (
    SPEC,
    bandit_step,
    make_catalogue,
    make_request,
    make_transitions,
)

torch.set_num_threads(1)
CAT = make_catalogue(SPEC)

# Four unit vectors in the plane: â = e0 has e0 and e1 as its two nearest items, while the
# critic q(e) = e·(0, 1) prefers e2, which only a wider search finds.
E_ND = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])


def _q_up(e: torch.Tensor) -> torch.Tensor:
    return e @ torch.tensor([0.0, 1.0])


def _trained_agent(spec: WorldSpec, seed: int = 0, **over) -> W.WolpertingerAgent:
    agent = registry.make_agent("wolpertinger", spec, seed=seed, batch_size=16,
                                learning_starts=16, catalogue=make_catalogue(spec), **over)
    agent.learn_many(make_transitions(spec, n=48, seed=seed))
    agent.policy().explore = False
    return agent


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_knn_then_critic_argmax_by_hand(metric):
    proto_BD = torch.tensor([[1.0, 0.0]])
    value, q_Bk, idx_Bk = W.wolpertinger_value(proto_BD, E_ND, None, 2, _q_up, metric)
    assert sorted(idx_Bk[0].tolist()) == [0, 1]
    assert value.item() == pytest.approx(0.6)  # e1 wins among the two neighbours
    value, _, _ = W.wolpertinger_value(proto_BD, E_ND, None, 4, _q_up, metric)
    assert value.item() == pytest.approx(1.0)  # k = N: the critic's argmax over everything
    masked = torch.tensor([[True, False, True, True]])  # a candidate set without item 1
    value, _, idx_Bk = W.wolpertinger_value(proto_BD, E_ND, masked, 2, _q_up, metric)
    assert sorted(idx_Bk[0].tolist()) == [0, 2] and value.item() == pytest.approx(1.0)


def test_k_equal_to_candidates_is_the_critics_topk():
    agent = _trained_agent(SPEC, knn_k=SPEC.num_candidates)
    for seed in range(5):
        obs, cands = make_request(SPEC, seed=seed)
        slate = agent.policy().recommend(obs, cands, SPEC.slate_size)
        req = request_batch(obs, cands, SPEC)
        with torch.no_grad():
            q_N = agent.net.q(req.state)(agent.net.embed(req.candidates_BN,
                                                         req.cand_features_BNF))[0]
        best = cands.ids[torch.topk(q_N, SPEC.slate_size).indices.numpy()]
        assert slate.items.tolist() == best.tolist()
        np.testing.assert_array_equal(slate.propensities, 1.0)


def test_k_equal_to_catalogue_is_the_critics_argmax_through_faiss():
    spec = WorldSpec(n_items=12, user_obs_dim=4, item_feature_dim=0, slate_size=3,
                     num_candidates=0)
    agent = _trained_agent(spec, knn_k=spec.n_items)
    empty = Candidates(ids=np.zeros(0, np.int64), features_NF=np.zeros((0, 0), np.float32))
    for seed in range(5):
        obs = Observation("u", np.random.default_rng(seed).normal(size=4).astype(np.float32),
                          history=(seed, 7))
        slate = agent.policy().recommend(obs, empty, spec.slate_size)
        req = request_batch(obs, empty, spec)
        with torch.no_grad():
            items_ID = agent.net.embed(torch.arange(spec.n_items), agent.features_IF)
            q_I = agent.net.q(req.state)(items_ID.unsqueeze(0))[0]
        assert slate.items.tolist() == torch.topk(q_I, spec.slate_size).indices.tolist()


def test_k_one_is_the_nearest_item_to_the_proto_action():
    agent = _trained_agent(SPEC, knn_k=1)
    obs, cands = make_request(SPEC, seed=3)
    slate = agent.policy().recommend(obs, cands, 1)
    req = request_batch(obs, cands, SPEC)
    with torch.no_grad():
        sim_N = agent.net.embed(req.candidates_BN, req.cand_features_BNF)[0] @ agent.net.proto(
            req.state)[0]
    assert slate.items[0] == cands.ids[int(sim_N.argmax())]


def test_proto_action_stays_on_the_item_manifold():
    agent = registry.make_agent("wolpertinger", SPEC, seed=1, catalogue=CAT, batch_size=16,
                                learning_starts=16,
                                manifold_coef=2.0)
    batch = to_batch(make_transitions(SPEC, n=32, seed=5), SPEC, CAT)
    with torch.no_grad():
        assert torch.allclose(agent.net.proto(batch.state).norm(dim=-1), torch.ones(32))
        assert torch.allclose(agent.net.embed(batch.slate_BK, batch.slate_features_BKF)
                              .norm(dim=-1), torch.ones(32, SPEC.slate_size))
    first = agent.update(batch).manifold_dist
    for _ in range(60):
        last = agent.update(batch).manifold_dist
    assert last < 0.5 * first  # the pull towards the nearest item works


def _hand_transition(state_obs, next_obs, cands, next_cands, done=False) -> Transition:
    return Transition(
        transition_id="t", user_id="u", session_id="s", request_id="r",
        state=UserView(observation=state_obs), slate=[cands[0]], propensities=[1.0],
        candidates=cands, policy="p",
        policy_version=0, chosen_item=cands[0], chosen_position=0, reward=1.0,
        next_state=UserView(observation=next_obs), next_slate=next_cands[:1] if next_cands else [],
        next_candidates=next_cands, done=done, served_ts=0.0, outcome_ts=0.0)


def test_target_runs_the_target_pipeline_on_the_next_state():
    spec = WorldSpec(n_items=4, user_obs_dim=2, item_feature_dim=2, slate_size=1,
                     num_candidates=4)
    agent = registry.make_agent("wolpertinger", spec, seed=0, knn_k=2, gamma=0.5)
    # Hand-built target pipeline: â' is the observation, items are their features, q = e·(0,1).
    agent.target.proto = lambda state: F.normalize(state.user_obs_BU, dim=-1)
    agent.target.embed = lambda ids, feats: feats
    agent.target.q = lambda state: _q_up

    def online_must_not_be_used(*args, **kwargs):
        raise AssertionError("the target used an online network")

    agent.net.proto = agent.net.q = agent.net.embed = online_must_not_be_used
    batch = to_batch([
        # s' points at e0: neighbours {e0, e1} -> 0.6 (s itself would point at e2 -> 1.0)
        _hand_transition([0.0, 1.0], [1.0, 0.0], [0, 1, 2, 3], [0, 1, 2, 3]),
        # the next request's candidates lack e1: neighbours {e0, e2} -> 1.0
        _hand_transition([1.0, 0.0], [1.0, 0.0], [0, 1], [0, 2, 3]),
        # next candidates unknown: the current ones stand in ({e0, e1} -> 0.6)
        _hand_transition([1.0, 0.0], [1.0, 0.0], [0, 1, 3], [], done=True),
    ], spec, ItemCatalogue(E_ND.numpy()))  # item i's features are E_ND[i]
    value_B = agent.target_value(batch)
    assert value_B.tolist() == pytest.approx([0.6, 1.0, 0.6])
    y_B = W.td_target(batch.reward_B, value_B, batch.done_B, agent.config.gamma)
    assert y_B.tolist() == pytest.approx([1.3, 1.5, 1.0])


def test_skipped_items_earn_zero_and_the_click_its_reward():
    batch = to_batch(make_transitions(SPEC, n=32, seed=2), SPEC, CAT)
    r_BK = W.slate_rewards(batch)
    for b in range(batch.size):
        for k in range(SPEC.slate_size):
            want = batch.reward_B[b].item() if batch.chosen_B[b].item() == k else 0.0
            assert r_BK[b, k].item() == want


@pytest.mark.parametrize("num_candidates", [6, 0], ids=["candidates", "catalogue"])
def test_learns_a_tiny_bandit(num_candidates):
    spec = WorldSpec(n_items=6, user_obs_dim=2, item_feature_dim=0, slate_size=2,
                     num_candidates=num_candidates)
    # k = 2 of 6 items: the best item is only found if the actor learns to point at it.
    agent = registry.make_agent("wolpertinger", spec, seed=0, knn_k=2, batch_size=32,
                                learning_starts=32, epsilon=0.2)
    pol, rng = agent.policy(), np.random.default_rng(0)
    for t in range(200):
        bandit_step(agent, pol, spec, rng, t)
    pol.explore = False
    obs = Observation("u", np.array([0.5, -0.5], np.float32))
    for _ in range(5):
        ids = rng.permutation(6).astype(np.int64) if num_candidates else np.zeros(0, np.int64)
        slate = pol.recommend(obs, Candidates(ids, np.zeros((len(ids), 0), np.float32)), 2)
        assert slate.items[0] == 0


def test_snapshot_policy_serves_like_the_live_one():
    agent = _trained_agent(SPEC)
    tensors, manifest = agent.state_tensors(), {"config": agent.config_dict(), "version": 3}
    served = W.load_policy(tensors, manifest, SPEC)
    served.explore = False
    assert served.version == 3
    for seed in range(3):
        obs, cands = make_request(SPEC, seed=seed)
        assert (served.recommend(obs, cands, 3).items.tolist()
                == agent.policy().recommend(obs, cands, 3).items.tolist())
    np.testing.assert_array_equal(served.item_embeddings(), agent.policy().item_embeddings())


def test_faiss_index_follows_the_live_weights():
    spec = WorldSpec(n_items=20, user_obs_dim=4, item_feature_dim=0, slate_size=2,
                     num_candidates=0)
    agent = registry.make_agent("wolpertinger", spec, seed=0, knn_k=20)
    pol = agent.policy()
    pol.explore = False
    obs = Observation("u", np.ones(4, np.float32), history=(3,))
    empty = Candidates(np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    pol.recommend(obs, empty, 2)  # builds the index
    index_before = pol._index[1]
    agent.update(to_batch(make_transitions(spec, n=16, seed=1), spec))
    pol.recommend(obs, empty, 2)
    assert pol._index[1] is not index_before  # rebuilt from the updated item vectors
    stored = pol._index[1].reconstruct_n(0, spec.n_items)
    np.testing.assert_allclose(stored, pol.item_embeddings(), rtol=1e-6)
