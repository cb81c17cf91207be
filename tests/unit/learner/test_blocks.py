"""The shared blocks: events-to-tensors, replay, networks, snapshot helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Transition, UserView
from recloop.core.ports import Candidates
from recloop.core.spec import WorldSpec
from recloop.learner import nets
from recloop.learner.batch import request_batch, to_batch
from recloop.learner.replay import PrioritisedReplay, ReplayBuffer
from tests.unit.learner.synth import SPEC, make_request, make_transitions

torch.set_num_threads(1)
SMALL = WorldSpec(n_items=10, user_obs_dim=2, item_feature_dim=1, slate_size=2,
                  num_candidates=3, history_len=3)
SMALL_CAT = ItemCatalogue(np.arange(10, dtype=np.float32).reshape(10, 1) / 10)  # item i: i/10


def _t(**kw) -> Transition:
    base = dict(transition_id="t", user_id="u", session_id="s", request_id="r",
                state=UserView(observation=[1.0, 2.0], history=[4, 5, 6, 7]),
                slate=[8, 3], propensities=[1.0, 0.5], candidates=[3, 9, 8],
                policy="p", policy_version=0,
                chosen_item=3, chosen_position=1, reward=2.5,
                next_state=UserView(observation=[0.0, 1.0], history=[5, 6, 7, 3]),
                next_slate=[9, 3], next_candidates=[9, 3, 1], done=False,
                served_ts=0.0, outcome_ts=1.0)
    base.update(kw)
    return Transition(**base)


def test_to_batch_by_hand():
    b = to_batch([_t(), _t(chosen_item=None, chosen_position=None, reward=0.0, done=True,
                        next_slate=[], next_candidates=[],
                        state=UserView(observation=[1.0, 2.0], history=[4]))], SMALL, SMALL_CAT)
    assert b.history_BH.tolist() == [[5, 6, 7], [4, -1, -1]]  # last H, oldest first
    assert b.history_mask_BH.tolist() == [[True] * 3, [True, False, False]]
    assert b.slate_cand_idx_BK[0].tolist() == [2, 0]
    assert b.slate_features_BKF[0, :, 0].tolist() == pytest.approx([0.8, 0.3])
    assert b.chosen_B.tolist() == [1, -1] and b.chosen_item_B.tolist() == [3, -1]
    assert b.reward_B.tolist() == [2.5, 0.0] and b.done_B.tolist() == [0.0, 1.0]
    assert b.propensities_BK[0].tolist() == [1.0, 0.5]
    assert b.next_slate_mask_B.tolist() == [True, False]
    assert b.next_slate_features_BKF[0, :, 0].tolist() == pytest.approx([0.9, 0.3])
    assert b.cand_features_BNF[0, :, 0].tolist() == pytest.approx([0.3, 0.9, 0.8])
    assert b.next_cand_features_BNF[0, :, 0].tolist() == pytest.approx([0.9, 0.3, 0.1])
    assert b.next_cand_features_BNF[1].abs().sum() == 0  # no successor: padding
    assert b.next_user_obs_BU[0].tolist() == [0.0, 1.0]
    assert b.clicked_B.tolist() == [True, False]


def test_to_batch_pads_ragged_candidates_and_finds_position_by_item():
    b = to_batch([_t(candidates=[3, 8], chosen_position=0), _t()], SMALL, SMALL_CAT)
    assert b.candidates_BN.tolist() == [[3, 8, -1], [3, 9, 8]]
    assert b.candidates_mask_BN[0].tolist() == [True, True, False]
    assert b.chosen_B.tolist() == [1, 1]  # position 0 holds 8, not the clicked 3
    assert b.cand_features_BNF[0, :, 0].tolist() == pytest.approx([0.3, 0.8, 0.0])


def test_request_batch_matches_to_batch_layout():
    obs, cands = make_request()
    req = request_batch(obs, cands, SPEC)
    assert req.state.user_obs_BU.shape == (1, SPEC.user_obs_dim)
    assert req.state.history_BH[0, :2].tolist() == list(obs.history)
    assert req.cand_features_BNF.shape == (1, len(cands), SPEC.item_feature_dim)


def test_uniform_replay_ring_and_seeded_sampling():
    rb = ReplayBuffer(3, seed=0)
    rb.push([1, 2, 3, 4])
    assert len(rb) == 3 and sorted(set(rb.sample(50))) == [2, 3, 4]
    a, b = ReplayBuffer(5, 1), ReplayBuffer(5, 1)
    a.push(range(5)), b.push(range(5))
    assert a.sample(8) == b.sample(8)


def test_replay_snapshot_with_items_round_trips():
    rb = ReplayBuffer(10, seed=3)
    ts = make_transitions(n=6)
    rb.push([(t, float(i) / 3) for i, t in enumerate(ts)])
    clone = ReplayBuffer(10, seed=99)
    clone.load_state_arrays(rb.state_arrays(with_items=True))
    assert clone.sample(5) == rb.sample(5)


def test_prioritised_replay_prefers_large_errors_and_weights():
    rb = PrioritisedReplay(4, seed=0, alpha=1.0, beta=1.0, eps=0.0)
    rb.push(["a", "b", "c", "d"])
    rb.update_priorities(np.array([0, 1, 2, 3]), np.array([1.0, 1.0, 1.0, 7.0]))
    items, slots, w = rb.sample(4000)
    assert items.count("d") / 4000 == pytest.approx(0.7, abs=0.03)
    # IS weight (N P)^-1 normalised by its max: d gets (4*.7)^-1 / (4*.1)^-1 = 1/7
    assert w[slots == 3][0] == pytest.approx(1 / 7, rel=1e-6)


def test_item_embedding_padding_is_zero_and_history_encoders():
    items = nets.ItemEmbedding(5, 4)
    assert torch.all(items(torch.tensor([-1])) == 0)
    hist = torch.tensor([[1, 2, -1], [-1, -1, -1]])
    mask = hist >= 0
    mean = nets.HistoryEncoder(items, "mean")(hist, mask)
    assert torch.allclose(mean[0], (items.weight_ID[1] + items.weight_ID[2]) / 2)
    assert torch.all(mean[1] == 0)
    gru = nets.HistoryEncoder(items, "gru")(hist, mask)
    assert gru.shape == (2, 4) and torch.all(gru[1] == 0)


def test_critic_broadcasts_over_candidates():
    critic = nets.Critic(3, 2)
    s, a = torch.randn(4, 3), torch.randn(4, 5, 2)
    q = critic(s, a)
    assert q.shape == (4, 5)
    assert torch.allclose(q[:, 1], critic(s, a[:, 1]))


def test_optimizer_and_generator_snapshot_exact():
    net = nets.mlp(2, (3,), 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    net2 = nets.mlp(2, (3,), 1)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    nets.module_from_arrays("n", net2, nets.module_to_arrays("n", net))
    nets.optimizer_from_arrays("o", opt2, nets.optimizer_to_arrays("o", opt))
    for n_, o_ in ((net, opt), (net2, opt2)):
        o_.zero_grad()
        n_(torch.ones(1, 2)).sum().backward()
        o_.step()
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)
    g = torch.Generator().manual_seed(1)
    g2 = torch.Generator()
    nets.generator_from_array(g2, nets.generator_to_array(g))
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=g2))


def test_to_batch_whole_catalogue_rows_have_no_candidates_but_catalogue_features():
    b = to_batch([_t(candidates=[], next_candidates=[])], SMALL, SMALL_CAT)
    assert b.candidates_BN.shape == (1, 0) and b.slate_cand_idx_BK.tolist() == [[-1, -1]]
    # A slate item's features come from the catalogue, with or without a candidate list.
    assert b.slate_features_BKF[0, :, 0].tolist() == pytest.approx([0.8, 0.3])
    assert b.next_slate_features_BKF[0, :, 0].tolist() == pytest.approx([0.9, 0.3])


def test_to_batch_without_catalogue_is_zeros_and_a_wrong_width_is_refused():
    b = to_batch([_t()], SMALL)
    assert b.slate_features_BKF.abs().sum() == 0 and b.cand_features_BNF.abs().sum() == 0
    with pytest.raises(ValueError, match="2 item features"):
        to_batch([_t()], SMALL, ItemCatalogue(np.zeros((10, 2), np.float32)))


def test_to_batch_item_the_catalogue_does_not_hold_yet_gets_zeros():
    b = to_batch([_t(slate=[8, 3])], SMALL, ItemCatalogue(np.ones((5, 1), np.float32)))
    assert b.slate_features_BKF[0, :, 0].tolist() == [0.0, 1.0]  # 8 is past its 5 items


def test_update_schedule_counts_credit_and_waits_for_learning_starts() -> None:
    from recloop.learner.replay import due_updates

    assert due_updates(17, stored=100, update_every=4, learning_starts=64, capacity=1000) == (4, 1)
    # Not enough stored yet: nothing is due and the credit is kept for later.
    assert due_updates(17, stored=10, update_every=4, learning_starts=64, capacity=1000) == (0, 17)
    # A replay smaller than learning_starts starts once it is full.
    assert due_updates(3, stored=50, update_every=1, learning_starts=64, capacity=50) == (3, 0)


def test_request_batch_shares_the_catalogues_read_only_matrix():
    """Serving hands a whole catalogue over as the catalogue's own read-only matrix: the
    request batch reads it in place (a million-row copy per request would be the request)."""
    cat = ItemCatalogue(np.arange(SPEC.n_items * SPEC.item_feature_dim, dtype=np.float32)
                        .reshape(SPEC.n_items, SPEC.item_feature_dim))
    obs, _ = make_request()
    req = request_batch(obs, Candidates(np.arange(SPEC.n_items), cat.features_NF), SPEC)
    assert np.shares_memory(req.cand_features_BNF.numpy(), cat.features_NF)
    np.testing.assert_array_equal(req.cand_features_BNF[0].numpy(), cat.features_NF)
