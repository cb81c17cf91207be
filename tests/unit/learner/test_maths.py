"""Each named function of learner.maths against a value computed by hand."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
from torch import nn

from recloop.learner import maths

torch.set_num_threads(1)


def test_td_target_by_hand():
    y = maths.td_target(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 10.0]),
                        torch.tensor([0.0, 1.0]), gamma=0.9)
    assert y.tolist() == pytest.approx([1.0 + 9.0, 2.0])


def test_discounted_returns_restart_after_done():
    r = maths.discounted_returns(np.array([1.0, 2.0, 3.0, 5.0]),
                                 np.array([False, False, True, True]), 0.5)
    # 1 + .5*2 + .25*3 = 2.75 ; 2 + .5*3 = 3.5 ; 3 ; then a new episode: 5
    assert r.tolist() == pytest.approx([2.75, 3.5, 3.0, 5.0])


def test_soft_and_hard_update():
    src, dst = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        src.weight.fill_(1.0), src.bias.fill_(2.0), dst.weight.fill_(0.0), dst.bias.fill_(0.0)
    maths.soft_update(dst, src, tau=0.25)
    assert dst.weight.item() == pytest.approx(0.25) and dst.bias.item() == pytest.approx(0.5)
    maths.hard_update(dst, src)
    assert dst.weight.item() == 1.0 and dst.bias.item() == 2.0


def test_capped_importance_weight():
    w = maths.capped_importance_weight(torch.tensor([0.2, 0.9, 0.5]),
                                       torch.tensor([0.4, 0.1, 0.0]), cap=3.0)
    assert w.tolist() == pytest.approx([0.5, 3.0, 3.0])  # 0.5 ; 9 capped ; β = 0 capped


def test_topk_lambda_limits_and_value():
    pi = torch.tensor([0.0, 1.0, 0.5])
    assert maths.topk_lambda(pi, 2).tolist() == pytest.approx([2.0, 0.0, 1.0])
    assert maths.topk_lambda(pi, 1).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert maths.topk_lambda(torch.tensor([0.5]), 3).item() == pytest.approx(3 * 0.25)


def test_topk_lambda_is_derivative_of_inclusion_prob():
    pi = torch.tensor([0.3], requires_grad=True)
    maths.topk_inclusion_prob(pi, 4).backward()
    assert pi.grad.item() == pytest.approx(maths.topk_lambda(torch.tensor([0.3]), 4).item())
    assert maths.topk_inclusion_prob(torch.tensor([0.5]), 2).item() == pytest.approx(0.75)


def test_choice_probs_and_slate_value_by_hand():
    v = torch.tensor([[1.0, 2.0, 1.0]])
    p = maths.slate_choice_probs(v, torch.tensor([4.0]))
    assert p[0].tolist() == pytest.approx([0.125, 0.25, 0.125])  # null gets 0.5
    q = torch.tensor([[8.0, 4.0, 0.0]])
    assert maths.slate_value(v, q, torch.tensor([4.0])).item() == pytest.approx(1.0 + 1.0)
    masked = maths.slate_choice_probs(v, torch.tensor([4.0]), torch.tensor([[True, True, False]]))
    assert masked[0].tolist() == pytest.approx([1 / 7, 2 / 7, 0.0])
    assert maths.choice_affinity(torch.tensor([0.0]), "logit").item() == 1.0
    assert maths.choice_affinity(torch.tensor([-1.0, 2.0]), "proportional").tolist() == [0.0, 2.0]


def _enum_value(v, q, v0, slate):
    s = np.array(slate)
    return (v[s] * q[s]).sum() / (v0 + v[s].sum())


def test_decomposition_equals_brute_force_enumeration():
    """Q(s, A) via the decomposition equals the expectation over the enumerated outcomes."""
    rng = np.random.default_rng(0)
    v, q, v0 = rng.random(5) + 0.1, rng.normal(size=5), 1.3
    for slate in combinations(range(5), 3):
        s = list(slate)
        outcomes = [(v[i] / (v0 + v[s].sum()), q[i]) for i in s] + [(v0 / (v0 + v[s].sum()), 0.0)]
        assert sum(p for p, _ in outcomes) == pytest.approx(1.0)
        brute = sum(p * val for p, val in outcomes)
        dec = maths.slate_value(torch.tensor(v[s])[None], torch.tensor(q[s])[None],
                                torch.tensor([v0])).item()
        assert dec == pytest.approx(brute)


def test_topk_selection_by_hand():
    # v*q = [2, 3, 0.5, 3.2]
    idx = maths.select_slate_topk(np.array([1, 1, 0.5, 2.0]), np.array([2, 3, 1, 1.6]), 2)
    assert idx.tolist() == [3, 1]
    masked = maths.select_slate_topk(np.array([1, 1, 0.5, 2.0]), np.array([2, 3, 1, 1.6]), 2,
                                     np.array([True, True, True, False]))
    assert masked.tolist() == [1, 0]


def test_exact_selection_agrees_with_enumeration():
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(3, 8))
        k = int(rng.integers(1, n))
        v, q, v0 = rng.random(n) * 2, rng.normal(size=n) * 3, float(rng.random() * 2 + 0.1)
        exact = maths.select_slate_exact(v, q, v0, k)
        brute = maths.select_slate_enumerate(v, q, v0, k)
        assert len(set(exact.tolist())) == k
        assert _enum_value(v, q, v0, exact) == pytest.approx(_enum_value(v, q, v0, brute))


def test_exact_selection_can_beat_topk():
    # A high-v low-q item inflates the denominator: top-K by v*q takes it, exact does not.
    v, q, v0 = np.array([10.0, 1.0, 1.0]), np.array([1.0, 5.0, 4.0]), 1.0
    assert sorted(maths.select_slate_topk(v, q, 2).tolist()) == [0, 1]
    assert sorted(maths.select_slate_exact(v, q, v0, 2).tolist()) == [1, 2]
    # (5 + 4) / 3 = 3 beats (10 + 5) / 12 = 1.25
    assert sorted(maths.select_slate_greedy(v, q, v0, 2).tolist()) == [1, 2]


def test_greedy_agrees_with_enumeration_on_easy_cases():
    # Equal affinities: the value is monotone in Σq, so greedy (and top-K) are optimal.
    rng = np.random.default_rng(2)
    for _ in range(30):
        q = rng.normal(size=6)
        v = np.full(6, 0.7)
        g = maths.select_slate_greedy(v, q, 1.0, 3)
        assert _enum_value(v, q, 1.0, g) == pytest.approx(
            _enum_value(v, q, 1.0, maths.select_slate_enumerate(v, q, 1.0, 3)))


def test_greedy_by_hand():
    # First pick maximises v q / (v0 + v): item 0: 4/3, item 1: 3/2 -> item 1; then item 0.
    v, q = np.array([2.0, 1.0, 1.0]), np.array([2.0, 3.0, 0.0])
    assert maths.select_slate_greedy(v, q, 1.0, 2).tolist() == [1, 0]


def test_pps_inclusion_probs_cap_and_sum():
    p = maths.pps_inclusion_probs(np.array([10.0, 1.0, 1.0, 2.0]), 2)
    # 10 is certain; the other slot is shared 1:1:2 -> 0.25, 0.25, 0.5
    assert p.tolist() == pytest.approx([1.0, 0.25, 0.25, 0.5])
    assert maths.pps_inclusion_probs(np.array([1.0, 1.0, 1.0, 1.0]), 2).tolist() == [0.5] * 4


def test_systematic_sample_hits_its_inclusion_probabilities():
    incl = np.array([1.0, 0.25, 0.25, 0.5])
    rng = np.random.default_rng(0)
    counts = np.zeros(4)
    for _ in range(4000):
        picked = maths.systematic_sample(incl, rng)
        assert len(picked) == 2 == len(set(picked.tolist()))
        counts[picked] += 1
    np.testing.assert_allclose(counts / 4000, incl, atol=0.03)


def test_epsilon_slate_propensities():
    rng = np.random.default_rng(0)
    idx, prop = maths.epsilon_slate(np.array([0, 1]), 4, 0.0, rng)
    assert idx.tolist() == [0, 1] and prop.tolist() == [1.0, 1.0]
    seen = np.zeros(4)
    for _ in range(4000):
        idx, prop = maths.epsilon_slate(np.array([0, 1]), 4, 0.2, rng)
        seen[idx] += 1
        np.testing.assert_allclose(prop, np.where(np.isin(idx, [0, 1]), 0.8 + 0.1, 0.1))
    np.testing.assert_allclose(seen / 4000, [0.9, 0.9, 0.1, 0.1], atol=0.03)
