"""The in-process runner: reproducible, honest baselines, and the exact wire events per user."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from recloop.core import codec
from recloop.core.catalogue import CatalogueAssembler
from recloop.core.events import (
    Click,
    EpisodeOutcome,
    Impression,
    ItemChunk,
    RecRequest,
    SessionEnd,
    SlateServed,
)
from recloop.core.ports import Candidates, Observation, Slate
from recloop.producer_sim.choice import Cascade, MultinomialLogit, MultinomialProportional
from recloop.producer_sim.cohort import InvalidSlate
from recloop.producer_sim.policies import MyopicOraclePolicy, RandomPolicy
from recloop.producer_sim.presets import interest_evolution, large_catalogue, tiny_world
from recloop.producer_sim.runner import Estimate, run_episodes


def test_same_seed_same_trajectory_other_seed_other_one() -> None:
    world = interest_evolution()
    a = run_episodes(world, RandomPolicy(seed=5), episodes=40, seed=11, users_in_parallel=16)
    b = run_episodes(world, RandomPolicy(seed=5), episodes=40, seed=11, users_in_parallel=16)
    c = run_episodes(world, RandomPolicy(seed=5), episodes=40, seed=12, users_in_parallel=16)
    for name in ("return_E", "steps_E", "clicks_E", "clicked_quality_E"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.return_E, c.return_E)


def test_tiny_world_has_a_known_best_policy() -> None:
    world = tiny_world()
    best = run_episodes(world, MyopicOraclePolicy(world), episodes=600, seed=0)
    rand = run_episodes(world, RandomPolicy(seed=1), episodes=600, seed=0)
    # Closed forms (see presets): 10 steps at 2/3 vs at (2/3 + 8·0.5006 + 6·0.0049)/15.
    assert (best.steps_E == 10).all() and (rand.steps_E == 10).all()
    assert abs(best.mean_return.mean - 20 / 3) < 2 * best.mean_return.ci95
    assert abs(rand.mean_return.mean - 3.134) < 2 * rand.mean_return.ci95


def test_estimate_is_a_normal_interval() -> None:
    est = Estimate.of(np.array([1.0, 2.0, 3.0, 4.0]))
    assert est.mean == 2.5 and est.n == 4
    assert est.ci95 == pytest.approx(1.96 * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_sink_gets_every_event_in_causal_order_per_user() -> None:
    world = interest_evolution()
    events = []
    report = run_episodes(
        world, RandomPolicy(seed=2), episodes=6, seed=3, sink=events.append, users_in_parallel=4
    )
    by_user = defaultdict(list)
    for e in events:
        assert codec.decode(codec.encode(e), type(e)) == e  # every event survives the wire
        by_user[e.user_id].append(e)
    assert len(by_user) == 6
    outcomes = {}
    for user_events in by_user.values():
        steps = _check_user_stream(user_events, world.slate_size, world.spec.num_candidates)
        outcome = user_events[-1]
        assert outcome.steps == steps
        outcomes[outcome.user_id] = outcome
    assert sorted(o.total_return for o in outcomes.values()) == sorted(report.return_E.tolist())
    assert sum(o.clicks for o in outcomes.values()) == report.clicks_E.sum()
    # Both branches of the stream check ran: steps with a click and steps without one.
    assert 0 < report.clicks_E.sum() < report.steps_E.sum()


def _check_user_stream(events, k: int, n_cand: int) -> int:
    """Assert one user's events follow Request, Slate, Impressions, [Click] ... End, Outcome."""
    i, step, clicks, total = 0, 0, 0, 0.0
    while isinstance(events[i], RecRequest):
        req, served = events[i], events[i + 1]
        assert req.step == step and len(req.candidates) == n_cand and len(req.observation) == 20
        assert isinstance(served, SlateServed) and served.request_id == req.request_id
        assert served.propensities == [k / n_cand] * k and served.policy == "random"
        assert served.candidates == req.candidates and served.observation == req.observation
        imps = events[i + 2 : i + 2 + k]
        assert [type(x) for x in imps] == [Impression] * k
        assert [x.item for x in imps] == served.items and all(x.slate_size == k for x in imps)
        i += 2 + k
        clicked = [x.position for x in imps if x.clicked]
        if clicked:
            click = events[i]
            assert isinstance(click, Click) and click.position == clicked[0]
            assert click.item == served.items[click.position] and click.request_id == req.request_id
            clicks, total, i = clicks + 1, total + click.reward, i + 1
        step += 1
    assert isinstance(events[i], SessionEnd) and events[i].steps == step
    outcome = events[i + 1]
    assert isinstance(outcome, EpisodeOutcome) and len(events) == i + 2
    assert outcome.clicks == clicks and outcome.total_return == pytest.approx(total)
    assert outcome.policy_steps == {"random:0": step}
    return step


def test_large_catalogue_requests_carry_no_candidates() -> None:
    world = large_catalogue()
    events = []
    run_episodes(world, RandomPolicy(seed=0), episodes=2, seed=0, sink=events.append)
    requests = [e for e in events if isinstance(e, RecRequest)]
    slates = [e for e in events if isinstance(e, SlateServed)]
    assert requests and all(r.candidates == [] for r in requests)
    assert all(s.propensities == [5 / world.catalogue.n_items] * 5 for s in slates)


class _RepeatingPolicy:
    name = "broken"

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        items = np.repeat(candidates.ids[:1], k)
        return Slate(items=items, scores=np.zeros(k), propensities=np.ones(k))


def test_an_invalid_slate_is_refused() -> None:
    with pytest.raises(InvalidSlate, match="repeats"):
        run_episodes(interest_evolution(), _RepeatingPolicy(), episodes=1, seed=0)


class _Recorder:
    """Uniform-random, remembering each observation it was shown."""

    name = "recorder"

    def __init__(self) -> None:
        self.inner, self.seen = RandomPolicy(seed=0), []

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        self.seen.append((observation, candidates))
        return self.inner.recommend(observation, candidates, k)


def test_policies_see_exactly_what_serving_would_decode() -> None:
    """The request's ids, and their features as serving looks them up in the catalogue
    the simulator publishes (``World.item_catalogue``) after it went over the wire."""
    world, policy, events = interest_evolution(), _Recorder(), []
    published = world.item_catalogue.chunks(ts=1.0)
    assembler = CatalogueAssembler()
    for chunk in published:
        assembler.add_chunk(codec.decode(codec.encode(chunk), ItemChunk))
    assembler.announce(world.item_catalogue.announcement())
    catalogue = assembler.install()
    assert catalogue is not None and catalogue.sha256 == world.item_catalogue.sha256
    run_episodes(world, policy, episodes=3, seed=0, sink=events.append)
    requests = [
        codec.decode(codec.encode(e), RecRequest) for e in events if isinstance(e, RecRequest)
    ]
    assert len(requests) == len(policy.seen)
    by_id = {(r.user_id, r.step): r for r in requests}
    for obs, cands in policy.seen:
        req = by_id[(obs.user_id, obs.step)]
        np.testing.assert_array_equal(obs.user_obs, np.asarray(req.observation, dtype=np.float32))
        np.testing.assert_array_equal(cands.ids, req.candidates)
        np.testing.assert_array_equal(
            cands.features_NF, catalogue.features(np.asarray(req.candidates))
        )


@pytest.mark.parametrize(
    "choice",
    [
        MultinomialLogit(null_logit=1.0, scale=2.0),
        MultinomialProportional(),
        Cascade(score_scaling=0.5),
    ],
    ids=lambda c: type(c).__name__,
)
def test_every_choice_model_drives_the_world(choice) -> None:
    world = interest_evolution(choice=choice)
    rand = run_episodes(world, RandomPolicy(seed=0), episodes=60, seed=0)
    best = run_episodes(world, MyopicOraclePolicy(world), episodes=60, seed=0)
    assert (rand.return_E > 0).all() and (rand.steps_E > 0).all()
    # Whatever the choice model, ranking by true click probability clicks more than chance.
    assert best.ctr.mean > rand.ctr.mean + best.ctr.ci95 + rand.ctr.ci95
