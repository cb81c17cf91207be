"""Document model, user model and Simulation steps against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.producer_sim.documents import sample_candidates
from recloop.producer_sim.presets import (
    interest_evolution,
    large_catalogue,
    recsim_cluster_quality_means,
    tiny_world,
)
from recloop.producer_sim.users import InterestUsers, UserConfig
from recloop.producer_sim.world import Simulation


def test_recsim_quality_means() -> None:
    means = recsim_cluster_quality_means(20)
    assert means.shape == (20,)
    np.testing.assert_allclose(means[:14], np.linspace(-3, 0, 14))
    np.testing.assert_allclose(means[14:], np.linspace(0, 3, 6))
    # Both ranges include 0, so two clusters (the 14th and 15th) have mean quality exactly 0.
    assert (means < 0).sum() == 13 and (means == 0).sum() == 2 and (means > 0).sum() == 5


def test_interest_evolution_catalogue() -> None:
    world = interest_evolution(seed=3, n_items=20_000)
    cat = world.catalogue
    np.testing.assert_array_equal(cat.features_NF.argmax(axis=1), cat.cluster_N)
    np.testing.assert_array_equal(cat.features_NF.sum(axis=1), 1.0)
    np.testing.assert_array_equal(cat.length_N, 4.0)
    means = recsim_cluster_quality_means(20)
    for c in range(20):
        q = cat.quality_N[cat.cluster_N == c]
        assert abs(q.mean() - means[c]) < 0.03 and abs(q.std() - 0.1) < 0.02
    spec = world.spec
    assert (spec.n_items, spec.user_obs_dim, spec.item_feature_dim) == (20_000, 20, 20)
    assert (spec.slate_size, spec.num_candidates) == (3, 10)


@pytest.mark.parametrize("n_items,n_cand", [(1000, 10), (12, 10), (6, 6)])
def test_candidates_are_distinct_and_uniform(n_items: int, n_cand: int) -> None:
    ids_UC = sample_candidates(n_items, 5000, n_cand, np.random.default_rng(0))
    assert ids_UC.shape == (5000, n_cand) and ids_UC.dtype == np.int64
    assert (np.sort(ids_UC, axis=1)[:, 1:] != np.sort(ids_UC, axis=1)[:, :-1]).all()
    counts = np.bincount(ids_UC.ravel(), minlength=n_items)
    expected = 5000 * n_cand / n_items
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected) + 1


def test_budget_update_closed_form() -> None:
    users = InterestUsers(UserConfig())
    budget = users.spend(
        np.array([10.0, 10.0, 10.0]),
        np.array([True, True, False]),
        np.array([4.0, 4.0, 0.0]),
        np.array([2.0, -3.0, 9.0]),
    )
    rho = 0.9 / 3.4
    np.testing.assert_allclose(budget, [10 - 4 + rho * 4 * 2.0, 10 - 4 - rho * 4 * 3.0, 9.5])


def test_interest_update_moves_the_clicked_cluster_only() -> None:
    users = InterestUsers(UserConfig(dim=3))
    n = 40_000
    interests_UD = np.tile([0.5, -0.2, 0.3], (n, 1))
    f_UD = np.tile([0.0, 1.0, 0.0], (n, 1))
    after_UD = users.update_interests(interests_UD, f_UD, np.random.default_rng(0))
    np.testing.assert_array_equal(after_UD[:, [0, 2]], interests_UD[:, [0, 2]])
    step = 0.3 * (1 - 0.2) * (1 - (-0.2))  # alpha(u) * (f - u) in the clicked cluster
    toward = np.isclose(after_UD[:, 1], -0.2 + step)
    assert (toward | np.isclose(after_UD[:, 1], -0.2 - step)).all()
    # Towards the item with probability (u + 1) / 2 = 0.4.
    assert abs(toward.mean() - 0.4) < 4 * np.sqrt(0.4 * 0.6 / n)


def test_step_scores_watch_time_and_ends_sessions() -> None:
    """One step per fresh simulation, over simulation seeds until every user has both clicked
    and missed: a click watches min(budget, length) and refunds ρ·watch·quality, a miss costs
    0.5 and leaves the interests alone; the session ends when the budget is spent."""
    world = interest_evolution(seed=0)
    budgets = np.array([2.5, 0.4, 100.0])
    rho, cat = UserConfig().budget_refund_rate, world.catalogue
    slate_UK = np.tile(np.arange(3), (3, 1))
    seen: set[tuple[int, bool]] = set()
    for seed in range(200):
        sim = Simulation(world, capacity=3, seed=seed)
        sim.spawn(np.arange(3))
        sim.pop.budget_U[:] = budgets
        interests_UD = sim.pop.interests_UD.copy()
        out = sim.step(np.arange(3), slate_UK)
        for u in range(3):
            clicked = bool(out.position_U[u] >= 0)
            seen.add((u, clicked))
            if clicked:
                item = slate_UK[u, out.position_U[u]]
                watch = min(budgets[u], cat.length_N[item])
                assert out.item_U[u] == item and out.reward_U[u] == watch
                assert out.quality_U[u] == cat.quality_N[item]
                assert sim.pop.budget_U[u] == pytest.approx(
                    budgets[u] - watch + rho * watch * cat.quality_N[item]
                )
            else:
                assert out.reward_U[u] == 0 and out.item_U[u] == -1 and out.quality_U[u] == 0
                assert sim.pop.budget_U[u] == budgets[u] - 0.5
                np.testing.assert_array_equal(sim.pop.interests_UD[u], interests_UD[u])
        np.testing.assert_array_equal(out.done_U, sim.pop.budget_U <= 0)
        assert out.done_U[1]  # 0.4 left: a click watches it all, a miss costs 0.5
        assert not out.done_U[2]
        np.testing.assert_array_equal(sim.pop.steps_U, 1)
        if len(seen) == 6:
            break
    assert seen == {(u, c) for u in range(3) for c in (True, False)}, seen


def test_tiny_world_and_large_catalogue_shapes() -> None:
    tiny = tiny_world()
    assert tiny.spec.n_items == 6 and tiny.spec.num_candidates == 6 and tiny.spec.slate_size == 2
    big = large_catalogue()
    assert big.spec.n_items >= 100_000 and big.spec.num_candidates == 0
    norms = np.linalg.norm(big.catalogue.features_NF, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    np.testing.assert_array_equal(
        big.item_features(np.array([[5, 7]])), big.catalogue.features_NF[[[5, 7]]]
    )
    sim = Simulation(big, 4, seed=0)
    sim.spawn(np.arange(4))
    assert sim.candidates(np.arange(4)) is None  # the whole catalogue
