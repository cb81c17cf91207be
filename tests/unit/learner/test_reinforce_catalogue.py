"""REINFORCE over the whole catalogue: the exact normaliser, the sampled one, and the agent's
use of both (``recloop.learner.algorithms.reinforce``, issue 13 item 4).

The maths against hand-computed values; the agent's log π against a softmax written out here
over the catalogue's own feature rows.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from recloop.learner import registry
from recloop.learner.agent import NoCatalogueError
from recloop.learner.algorithms.reinforce import (
    catalogue_log_normaliser,
    sampled_log_normaliser,
)
from recloop.learner.batch import to_batch
from tests.unit.learner.synth import SPEC, make_catalogue, make_transitions

torch.set_num_threads(1)
WHOLE = dataclasses.replace(SPEC, num_candidates=0, n_items=50)


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_exact_normaliser_is_logsumexp_and_its_gradient(chunk):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(37, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    logz = catalogue_log_normaliser(s, v, chunk)
    torch.testing.assert_close(logz, (s @ v.T).logsumexp(-1))
    assert torch.autograd.gradcheck(lambda a, b: catalogue_log_normaliser(a, b, chunk), (s, v))


def test_sampled_normaliser_by_hand():
    # Row 0: targets {0, 1}; draws 1 (a hit, removed), 2, 2 of M = 3 from Q = 1/4 each.
    # Row 1: targets {3} (a repeat and padding count once / not at all); no draw hits.
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.5, -1.0, 0.0, 1.5]], dtype=torch.float64)
    slate = torch.tensor([[0, 1], [3, 3]])
    slate = torch.cat([slate, torch.tensor([[-1], [-1]])], 1)
    neg = torch.tensor([1, 2, 2])
    log_q = torch.full((3,), math.log(0.25), dtype=torch.float64)
    got = sampled_log_normaliser(logits.gather(1, slate.clamp(min=0)), slate, logits[:, neg],
                                 neg, log_q)
    e = math.exp
    want = [math.log(e(0) + e(1) + 2 * e(2) / 0.75),
            math.log(e(1.5) + (e(-1) + 2 * e(0)) / 0.75)]
    assert got.tolist() == pytest.approx(want)


def test_sampled_normaliser_is_unbiased_for_z():
    gen = torch.Generator().manual_seed(1)
    n, m = 1000, 64
    logits = torch.randn(3, 8, generator=gen) @ torch.randn(8, n, generator=gen) / 3
    slate = torch.tensor([[1, 2], [3, -1], [5, 5]])
    draws = []
    for _ in range(2000):
        neg = torch.randint(0, n, (m,), generator=gen)
        draws.append(sampled_log_normaliser(logits.gather(1, slate.clamp(min=0)), slate,
                                            logits[:, neg], neg,
                                            torch.full((m,), -math.log(n))).exp())
    ratio = torch.stack(draws).mean(0) / logits.exp().sum(-1)
    assert ratio.tolist() == pytest.approx([1.0] * 3, abs=0.03)


def _whole_agent(**overrides):
    cat = make_catalogue(WHOLE)
    agent = registry.make_agent("reinforce", WHOLE, 0, catalogue=cat, **overrides)
    batch = to_batch(make_transitions(WHOLE, n=32, catalogue=cat), WHOLE, cat)
    return agent, cat, batch


def _softmax_by_hand(agent, cat, batch, beta=False):
    """log π (or log β) over all 50 items from the catalogue's rows, written out."""
    ids = torch.arange(WHOLE.n_items)
    feats = torch.from_numpy(np.array(cat.features_NF))
    s = agent.net.state.encode(batch.state)
    logits = agent.net.logits(s, ids.expand(batch.size, -1),
                              feats.expand(batch.size, -1, -1), beta)
    return torch.log_softmax(logits, -1).gather(1, batch.slate_BK.clamp(min=0))


@pytest.mark.parametrize("beta", [False, True])
def test_exact_mode_is_the_softmax_over_the_catalogue(beta):
    agent, cat, batch = _whole_agent()
    actions = agent.action_set(batch)
    assert actions.mode == "exact"
    s = agent.net.state.encode(batch.state)
    logp, found = agent.slate_log_probs(batch, actions, s, beta)
    assert found.all()
    torch.testing.assert_close(logp, _softmax_by_hand(agent, cat, batch, beta))


def test_sampled_mode_approaches_the_exact_softmax():
    agent, cat, batch = _whole_agent(exact_max_items=10, sampled_softmax=20_000)
    actions = agent.action_set(batch)
    assert actions.mode == "sampled" and actions.ids.shape == (20_000,)
    s = agent.net.state.encode(batch.state)
    for beta in (False, True):
        logp, _ = agent.slate_log_probs(batch, actions, s, beta)
        torch.testing.assert_close(logp, _softmax_by_hand(agent, cat, batch, beta), atol=0.03,
                                   rtol=0)
        assert (logp < 0).all()  # a probability: the targets are counted in the normaliser


@pytest.mark.parametrize("sampled", [False, True])
def test_whole_catalogue_update_moves_the_item_feature_weights(sampled):
    agent, _, batch = _whole_agent(**({"exact_max_items": 10} if sampled else {}))
    assert agent.net.item.features is not None and agent.net.beta_item.features is not None
    before = [agent.net.item.features.weight.clone(), agent.net.beta_item.features.weight.clone()]
    metrics = agent.update(batch)
    assert metrics.rewarded > 0 and 0 < metrics.mean_pi < 1
    after = [agent.net.item.features.weight, agent.net.beta_item.features.weight]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_whole_catalogue_with_features_and_no_catalogue_refuses():
    agent = registry.make_agent("reinforce", WHOLE, 0)
    batch = to_batch(make_transitions(WHOLE, n=8), WHOLE, make_catalogue(WHOLE))
    with pytest.raises(NoCatalogueError):
        agent.update(batch)


@pytest.mark.parametrize("topk_k", [0, 1, 5])
def test_the_k_of_lambda_is_configurable(topk_k):
    agent, _, batch = _whole_agent(topk_k=topk_k, behaviour="logged", weight_cap=1e9)
    k = topk_k or WHOLE.slate_size
    assert agent.topk_k == k
    clicked = torch.nonzero(batch.chosen_B >= 0)[0]  # one rewarded row: its weight by hand
    row = dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[clicked]
                                        for f in dataclasses.fields(batch)})
    m = agent.update(row)
    pi = m.mean_pi
    beta = float(row.propensities_BK[0, row.chosen_B[0]]) / WHOLE.slate_size
    assert m.mean_weight == pytest.approx(pi / beta * k * (1 - pi) ** (k - 1), rel=1e-5)


def test_negative_topk_k_is_refused():
    with pytest.raises(ValueError, match="topk_k"):
        registry.make_agent("reinforce", WHOLE, 0, topk_k=-1)
