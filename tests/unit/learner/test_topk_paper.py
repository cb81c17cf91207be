"""The top-K off-policy correction paper's own facts (Chen et al. 2019, §4.2-4.3 toy).

Stateless softmax over θ ∈ R^10, expected-gradient ascent: the expectation over the behaviour
policy β is taken exactly (Σ_a β_a · per-sample gradient), so there is no sampling noise.
The per-sample gradient is the module's: pg_weights(π, β, K, c) · R · ∇ log π(a).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recloop.learner.algorithms.reinforce import pg_weights
from recloop.learner.maths import topk_lambda

torch.set_num_threads(1)


def ascend(rewards, beta, k, off_policy, topk, steps=2500, lr=0.05):
    # A small step: at lr 0.5 the top-K iteration settles into a 2-cycle around (0.7, 0.3).
    r, b = torch.tensor(rewards, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    theta = torch.zeros(len(rewards), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr)
    for _ in range(steps):
        logp = torch.log_softmax(theta, 0)
        w = pg_weights(logp.exp().detach(), b, k, cap=1e9, off_policy=off_policy, topk=topk)
        objective = (b * w * r * logp).sum()  # E_{a~β}[w(a) R(a) log π(a)]
        opt.zero_grad()
        (-objective).backward()
        opt.step()
    return torch.softmax(theta, 0).detach().numpy()


REWARDS_A = [10.0, 9.0] + [1.0] * 8
UNIFORM = [0.1] * 10


def test_topk_correction_reaches_the_papers_fixed_point():
    c = 1.0 / (1.0 / 10 + 1.0 / 9)
    expected = np.array([1 - c / 10, 1 - c / 9] + [0.0] * 8)
    assert expected[:2] == pytest.approx([0.526, 0.474], abs=1e-3)
    pi = ascend(REWARDS_A, UNIFORM, k=2, off_policy=True, topk=True)
    np.testing.assert_allclose(pi, expected, atol=1e-2)


def test_standard_correction_puts_all_mass_on_item_one():
    pi = ascend(REWARDS_A, UNIFORM, k=2, off_policy=True, topk=False)
    assert pi[0] > 0.99


REWARDS_B = [float(i) for i in range(1, 11)]
SKEWED = [(11 - i) / 55.0 for i in range(1, 11)]  # β_i ∝ 11 - i: favours low rewards


def test_uncorrected_reinforce_converges_to_reward_times_behaviour():
    pi = ascend(REWARDS_B, SKEWED, k=1, off_policy=False, topk=False)
    rb = np.array(REWARDS_B) * np.array(SKEWED)
    np.testing.assert_allclose(pi, rb / rb.sum(), atol=1e-3)


def test_corrected_reinforce_converges_to_the_best_item():
    pi = ascend(REWARDS_B, SKEWED, k=1, off_policy=True, topk=False)
    assert pi.argmax() == 9 and pi[9] > 0.99


def test_capping_bounds_the_weight():
    w = pg_weights(torch.tensor([0.9, 0.01]), torch.tensor([0.01, 0.01]), k=1, cap=np.e**3)
    assert w.tolist() == pytest.approx([np.e**3, 1.0])
    w2 = pg_weights(torch.tensor([0.5]), torch.tensor([0.25]), k=3, cap=10.0)
    assert w2.item() == pytest.approx(2.0 * topk_lambda(torch.tensor([0.5]), 3).item())
