"""Choice models: probabilities are distributions, match closed forms, and sampling follows them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from recloop.producer_sim.choice import Cascade, MultinomialLogit, MultinomialProportional, sample

MODELS = [
    MultinomialLogit(null_logit=0.5, scale=2.0),
    MultinomialProportional(no_click_mass=1.0, min_normalizer=-1.0),
    Cascade(attention_prob=0.8, score_scaling=0.4, min_normalizer=-1.0),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_probabilities_are_distributions(model) -> None:
    affinity_UK = np.random.default_rng(0).uniform(-1, 1, size=(500, 4))
    probs_UK1 = model.probabilities(affinity_UK)
    assert probs_UK1.shape == (500, 5)
    assert (probs_UK1 >= 0).all()
    np.testing.assert_allclose(probs_UK1.sum(axis=1), 1.0, atol=1e-12)


def test_multinomial_logit_closed_form() -> None:
    probs = MultinomialLogit(null_logit=0.5, scale=2.0).probabilities(np.array([[0.0, 1.0, -1.0]]))[
        0
    ]
    w = np.array([math.exp(0.0), math.exp(2.0), math.exp(-2.0), math.exp(0.5)])
    np.testing.assert_allclose(probs, w / w.sum(), rtol=1e-12)


def test_multinomial_proportional_is_recsims_interest_evolution_choice() -> None:
    # Scores <u, d> + 1 against a null score of 2 (no_click_mass 1, min_normalizer -1).
    probs = MultinomialProportional().probabilities(np.array([[0.5, -1.0, 0.2]]))[0]
    np.testing.assert_allclose(probs, np.array([1.5, 0.0, 1.2, 2.0]) / 4.7, rtol=1e-12)


def test_cascade_closed_form() -> None:
    model = Cascade(attention_prob=0.8, score_scaling=0.4, min_normalizer=-1.0)
    probs = model.probabilities(np.array([[1.0, 0.0, -0.5]]))[0]
    c = 0.8 * 0.4 * np.array([2.0, 1.0, 0.5])  # examine-and-click probability per position
    expected = [c[0], (1 - c[0]) * c[1], (1 - c[0]) * (1 - c[1]) * c[2], np.prod(1 - c)]
    np.testing.assert_allclose(probs, expected, rtol=1e-12)


def test_invalid_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="min_normalizer"):
        MultinomialProportional().probabilities(np.array([[-1.5]]))
    with pytest.raises(ValueError, match="outside"):
        Cascade(score_scaling=0.9).probabilities(np.array([[1.0]]))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_sampling_frequencies_match_probabilities(model) -> None:
    n = 100_000
    affinity_UK = np.tile([[0.9, -0.3, 0.1, 0.6]], (n, 1))
    probs_K1 = model.probabilities(affinity_UK[:1])[0]
    chosen_U = sample(model.probabilities(affinity_UK), np.random.default_rng(7))
    assert set(np.unique(chosen_U)) <= {-1, 0, 1, 2, 3}
    # Column K (no click) is reported as -1; count it last to line up with probs_K1.
    counts = np.bincount(np.where(chosen_U < 0, 4, chosen_U), minlength=5)
    assert chisquare(counts, probs_K1 * n).pvalue > 1e-3
    # The same counts must reject a slightly wrong distribution, or the check proves nothing.
    wrong = probs_K1.copy()
    wrong[[0, -1]] += [0.02, -0.02]
    assert chisquare(counts, wrong * n).pvalue < 1e-6


def test_sample_is_reproducible_with_its_own_generator() -> None:
    probs_UK1 = MultinomialProportional().probabilities(
        np.random.default_rng(1).uniform(-1, 1, (50, 3))
    )
    a = sample(probs_UK1, np.random.default_rng(3))
    np.random.seed(999)  # global state must not matter
    b = sample(probs_UK1, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
