"""Fallbacks and exploration log the true inclusion probabilities of the slates they draw."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from recloop.core.ports import Candidates, Observation, Slate
from recloop.serving.exploration import explore
from recloop.serving.fallback import (
    PopularityCounts,
    PopularityPolicy,
    UniformPolicy,
    history_increment,
)

OBS = Observation(user_id="u", user_obs=np.zeros(2, dtype=np.float32))


def _candidates(ids: list[int]) -> Candidates:
    return Candidates(ids=np.asarray(ids, dtype=np.int64), features_NF=np.zeros((len(ids), 0)))


def _empirical(draw, n_draws: int) -> tuple[Counter, dict[int, set[float]]]:
    """How often each item appeared, and every propensity logged for it."""
    shown: Counter = Counter()
    logged: dict[int, set[float]] = {}
    for _ in range(n_draws):
        slate = draw()
        items = slate.items.tolist()
        assert len(set(items)) == len(items)
        for item, p in zip(items, slate.propensities.tolist(), strict=True):
            shown[item] += 1
            logged.setdefault(item, set()).add(round(p, 12))
    return shown, logged


def _assert_matches(shown: Counter, logged: dict[int, set[float]], n_draws: int) -> None:
    for item, props in logged.items():
        assert len(props) == 1, f"item {item} logged with several propensities {props}"
        p = props.pop()
        freq = shown[item] / n_draws
        # Four binomial standard errors: fails for a wrong propensity, not for noise.
        tolerance = 4 * np.sqrt(p * (1 - p) / n_draws) + 1e-9
        assert abs(freq - p) <= tolerance, (item, freq, p)


def test_uniform_propensities_are_k_over_n_and_match_frequencies():
    cands = _candidates([10, 11, 12, 13, 14, 15, 16])
    policy = UniformPolicy(np.random.default_rng(0))
    n_draws = 20_000
    shown, logged = _empirical(lambda: policy.recommend(OBS, cands, 3), n_draws)
    assert set(shown) == set(cands.ids.tolist())
    assert all(props == {round(3 / 7, 12)} for props in logged.values())
    _assert_matches(shown, logged, n_draws)


def test_popularity_propensities_are_exact_with_ties():
    counts = PopularityCounts(n_items=6)
    counts.add([0] * 5 + [1, 2, 3] * 3 + [4])  # counts 5, 3, 3, 3, 1, 0
    policy = PopularityPolicy(counts, np.random.default_rng(1))
    cands = _candidates([0, 1, 2, 3, 4, 5])
    n_draws = 12_000
    shown, logged = _empirical(lambda: policy.recommend(OBS, cands, 3), n_draws)
    assert logged[0] == {1.0}
    for item in (1, 2, 3):
        assert logged[item] == {round(2 / 3, 12)}
    assert 4 not in shown and 5 not in shown
    _assert_matches(shown, logged, n_draws)


def test_popularity_with_no_counts_is_uniform():
    policy = PopularityPolicy(PopularityCounts(), np.random.default_rng(2))
    slate = policy.recommend(OBS, _candidates([3, 4, 5, 6]), 2)
    assert slate.propensities.tolist() == [0.5, 0.5]


class _TopK:
    """Deterministic: always the first k candidates."""

    name = "topk"

    def recommend(self, observation, candidates, k):
        return Slate(candidates.ids[:k], np.arange(k, 0, -1.0), np.ones(k))


@pytest.mark.parametrize("epsilon", [0.2, 0.7])
def test_exploration_mixture_propensities_match_frequencies(epsilon):
    cands = _candidates([0, 1, 2, 3, 4, 5, 6, 7])
    policy, rng, k = _TopK(), np.random.default_rng(3), 3

    def draw():
        return explore(policy, policy.recommend(OBS, cands, k), OBS, cands, k, epsilon, rng).slate

    n_draws = 20_000
    shown, logged = _empirical(draw, n_draws)
    for item in range(8):
        expected = (1 - epsilon) * (item < k) + epsilon * k / 8
        assert logged[item] == {round(expected, 12)}
    _assert_matches(shown, logged, n_draws)


def test_exploration_passes_a_stochastic_policy_through():
    cands = _candidates([0, 1, 2, 3])
    uniform = UniformPolicy(np.random.default_rng(4))
    slate = uniform.recommend(OBS, cands, 2)
    out = explore(uniform, slate, OBS, cands, 2, 0.5, np.random.default_rng(5))
    assert out.branch == "passthrough"
    assert out.slate is slate


def test_history_increment_finds_the_new_positives_of_a_sliding_window():
    assert history_increment([], [4, 5]) == [4, 5]
    assert history_increment([1, 2, 3], [1, 2, 3]) == []
    assert history_increment([1, 2, 3], [2, 3, 9]) == [9]
    assert history_increment([1, 2, 3], [3, 7, 8]) == [7, 8]
    assert history_increment([1, 2], [5, 6]) == [5, 6]
