"""DRR: the state representation module (ave, p, u), the history window, targets, replay
priorities and a learning check on a tiny bandit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recloop.core.ports import Candidates, Observation
from recloop.core.spec import WorldSpec
from recloop.learner import registry
from recloop.learner.algorithms import drr as D
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


@pytest.mark.parametrize(("mode", "width"), [("ave", 3 * 16), ("p", 15 * 16), ("u", 15 * 16)])
def test_representation_shapes(mode, width):
    agent = registry.make_agent("drr", SPEC, seed=0, catalogue=CAT, state_rep=mode)
    batch = to_batch(make_transitions(SPEC, n=7), SPEC, CAT)
    s_BS = agent.net.rep(batch.state, agent.features_IF)
    assert s_BS.shape == (7, width) == (7, D.state_dim(mode, SPEC.history_len, 16))
    assert agent.net.critic(s_BS, agent.net.act(s_BS)).shape == (7,)
    assert agent.net.act(s_BS).shape == (7, 16)


def test_representations_by_hand():
    u = torch.tensor([[2.0, 3.0]])
    items = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # i_1, i_2, i_3
    w = torch.tensor([0.5, 1.0, 2.0])
    ave = torch.tensor([2.5, 3.0])  # 0.5 i_1 + 1 i_2 + 2 i_3
    torch.testing.assert_close(D.drr_state("ave", u, items, w)[0],
                               torch.cat([u[0], u[0] * ave, ave]))
    # w_a i_a = (0.5, 0), (0, 1), (2, 2); products for (1,2), (1,3), (2,3)
    pairs = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 2.0])
    torch.testing.assert_close(D.drr_state("p", u, items, w)[0],
                               torch.cat([items[0].flatten(), pairs]))
    user_items = torch.tensor([1.0, 0.0, 0.0, 3.0, 4.0, 6.0])  # u ⊙ w_a i_a
    torch.testing.assert_close(D.drr_state("u", u, items, w)[0], torch.cat([user_items, pairs]))
    with pytest.raises(ValueError, match="ave"):
        D.drr_state("nope", u, items, w)


def test_right_align_puts_the_most_recent_positive_last():
    hist = torch.tensor([[4, 7, -1, -1, -1], [1, 2, 3, 4, 5], [-1, -1, -1, -1, -1]])
    out, real = D.right_align(hist, hist >= 0)
    assert out.tolist() == [[-1, -1, -1, 4, 7], [1, 2, 3, 4, 5], [-1, -1, -1, -1, -1]]
    assert real.tolist() == [[False] * 3 + [True] * 2, [True] * 5, [False] * 5]


def _state(agent, spec, history):
    obs = Observation("u", np.ones(spec.user_obs_dim, np.float32), history=tuple(history))
    _, cands = make_request(spec)
    with torch.no_grad():
        return agent.net.rep(request_batch(obs, cands, spec).state, agent.features_IF)


def test_history_window_is_the_n_most_recent_positives():
    agent = registry.make_agent("drr", SPEC, seed=0, catalogue=CAT, state_rep="ave")
    n = SPEC.history_len
    # Only the n most recent positive items count: older ones fall out of the window.
    long_ = [9, 8, 1, 2, 3, 4, 5]
    torch.testing.assert_close(_state(agent, SPEC, long_), _state(agent, SPEC, long_[-n:]))
    assert not torch.allclose(_state(agent, SPEC, [1, 2, 3, 4, 5]),
                              _state(agent, SPEC, [1, 2, 3, 4, 6]))
    # With all weight on the last slot, ave is the most recent item, whatever the length.
    with torch.no_grad():
        agent.net.rep.w.copy_(torch.eye(n)[-1])
        e_last = agent.net.rep.embed(torch.tensor([7]), agent.features_IF[[7]])[0]
    dim = agent.config.dim
    for history in ([7], [3, 7], [1, 2, 3, 4, 5, 6, 7]):
        torch.testing.assert_close(_state(agent, SPEC, history)[0, 2 * dim:], e_last)


def test_target_is_the_target_networks_on_the_next_state():
    agent = registry.make_agent("drr", SPEC, seed=0, catalogue=CAT, learning_starts=8, batch_size=8)
    agent.learn_many(make_transitions(SPEC, n=24, seed=1))  # target ≠ online after updates
    batch = to_batch(make_transitions(SPEC, n=16, seed=3), SPEC, CAT)
    with torch.no_grad():
        s2_BS = agent.target.rep(batch.next_state, agent.features_IF)
        want_B = agent.target.critic(s2_BS, agent.target.act(s2_BS))
        s_BS = agent.target.rep(batch.state, agent.features_IF)
        on_s_B = agent.target.critic(s_BS, agent.target.act(s_BS))
        for p in agent.net.parameters():  # the online networks play no part
            p.add_(1.0)
    got_B = agent.target_value(batch)
    torch.testing.assert_close(got_B, want_B)
    assert not torch.allclose(got_B, on_s_B)


def test_prioritised_replay_gets_td_errors():
    agent = registry.make_agent("drr", SPEC, seed=0, catalogue=CAT, learning_starts=8, batch_size=8)
    agent.learn_many(make_transitions(SPEC, n=32, seed=1))
    pr = agent.replay.priorities[: len(agent.replay)]
    assert len(set(np.round(pr, 6))) > 5  # priorities now differ by TD error
    assert np.all(pr > 0)


@pytest.mark.parametrize("mode", ["ave", "p", "u"])
def test_learns_a_tiny_bandit(mode):
    spec = WorldSpec(n_items=6, user_obs_dim=2, item_feature_dim=0, slate_size=2,
                     num_candidates=6)
    agent = registry.make_agent("drr", spec, seed=0, state_rep=mode, batch_size=32,
                                learning_starts=32, epsilon=0.2)
    pol, rng = agent.policy(), np.random.default_rng(0)
    for t in range(150):
        bandit_step(agent, pol, spec, rng, t)
    pol.explore = False
    obs = Observation("u", np.array([0.5, -0.5], np.float32))
    for _ in range(5):
        ids = rng.permutation(6).astype(np.int64)
        assert pol.recommend(obs, Candidates(ids, np.zeros((6, 0), np.float32)), 2).items[0] == 0


def test_scores_are_item_vectors_dotted_with_the_action():
    agent = registry.make_agent("drr", SPEC, seed=0, catalogue=CAT)
    pol = agent.policy()
    pol.explore = False
    obs, cands = make_request(SPEC, seed=2)
    slate = pol.recommend(obs, cands, SPEC.slate_size)
    req = request_batch(obs, cands, SPEC)
    with torch.no_grad():
        a_D = agent.net.act(agent.net.rep(req.state, agent.features_IF))[0]
        scores_N = agent.net.rep.embed(req.candidates_BN, req.cand_features_BNF)[0] @ a_D
    top = torch.topk(scores_N, SPEC.slate_size)
    assert slate.items.tolist() == cands.ids[top.indices.numpy()].tolist()
    np.testing.assert_allclose(slate.scores, top.values.numpy(), rtol=1e-6)


def test_whole_catalogue_ranking_follows_the_live_weights():
    spec = WorldSpec(n_items=20, user_obs_dim=4, item_feature_dim=0, slate_size=3,
                     num_candidates=0)
    agent = registry.make_agent("drr", spec, seed=0)
    pol = agent.policy()
    pol.explore = False
    obs = Observation("u", np.ones(4, np.float32), history=(3,))
    empty = Candidates(np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    before = pol.item_embeddings()
    pol.recommend(obs, empty, 3)  # fills the catalogue cache
    agent.update(to_batch(make_transitions(spec, n=16, seed=1), spec))
    with torch.no_grad():
        e_ID = agent.net.rep.embed(torch.arange(20), agent.features_IF)
        a_D = agent.net.act(agent.net.rep(request_batch(obs, empty, spec).state,
                                          agent.features_IF))[0]
    assert not np.allclose(before, pol.item_embeddings())  # the cache saw the update
    np.testing.assert_allclose(pol.item_embeddings(), e_ID.numpy())
    assert pol.recommend(obs, empty, 3).items.tolist() == torch.topk(e_ID @ a_D, 3).indices.tolist()
