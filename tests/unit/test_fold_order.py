"""The fold's transitions are a function of a user's records, not of the order they came in.

After a backlog a fetch hands the fold one topic before the other, so a user's feedback can
come long before their slates (issue 11, item 1: a user with 37 slates ended with none).
"""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from recloop.core.events import Record, SessionEnd, SlateServed, Transition
from recloop.streams import fold
from recloop.streams.synthetic import SyntheticConfig, causal_events, slate_feedback, split_topics

U = "u1"


def _fold_all(events: list[Record]) -> dict[str, Transition]:
    """Every transition the fold emits over ``events``, by id; none may come twice."""
    states: dict[str, fold.FoldState] = {}
    out: dict[str, Transition] = {}
    for event in events:
        user_id = event.user_id
        states[user_id], more = fold.apply(states.get(user_id), event)
        for t in more:
            assert t.transition_id not in out, "a transition was emitted twice"
            out[t.transition_id] = t
    return out


def _slate(rid: str, step: int, item: int) -> SlateServed:
    return SlateServed(
        request_id=rid, user_id=U, session_id="s1", step=step, ts=100.0 + step,
        request_ts=100.0 + step, items=[item], scores=[0.0], propensities=[0.5], policy="p",
        policy_version=1, candidates=[item, item + 1], observation=[float(step)],
    )  # fmt: skip


def _small_session() -> list[Record]:
    """Three one-item slates, the middle one clicked, and the end: eight records."""
    return [
        _slate("r0", 0, 10), *slate_feedback(U, "s1", "r0", [10], None, 0.0, 110.0),
        _slate("r1", 1, 20), *slate_feedback(U, "s1", "r1", [20], 0, 2.5, 111.0),
        _slate("r2", 2, 30), *slate_feedback(U, "s1", "r2", [30], None, 0.0, 112.0),
        SessionEnd(event_id="s1-end", user_id=U, session_id="s1", steps=3, ts=113.0),
    ]  # fmt: skip


def test_every_permutation_of_a_small_session_gives_the_same_transitions():
    events = _small_session()
    assert len(events) == 8
    expected = _fold_all(events)
    assert [(t.request_id, t.reward, t.done) for t in expected.values()] == [
        ("r0", 0.0, False), ("r1", 2.5, False), ("r2", 0.0, True),
    ]  # fmt: skip
    for order in itertools.permutations(events):
        assert _fold_all(list(order)) == expected, [type(e).__name__ for e in order]


def test_all_feedback_before_all_slates_gives_every_transition():
    """The bug: more feedback than the old 64-record buffer came before the user's slates."""
    events = causal_events(SyntheticConfig(users=1, sessions=1, steps=37, seed=11))
    slates, feedback = split_topics(events)
    assert len(feedback) > 64
    expected = _fold_all(events)
    assert len(expected) == 37
    assert _fold_all(feedback + slates) == expected


def test_topic_grouped_fetches_of_several_users_give_every_transition():
    """A backlog consumed in fetches that each hand over the feedback, then the slates."""
    cfg = SyntheticConfig(users=6, sessions=2, steps=30, seed=3)
    events = causal_events(cfg)
    slates, feedback = split_topics(events)
    fetches: list[Record] = []
    for i in range(0, max(len(slates), len(feedback)), 600):
        fetches += feedback[i : i + 600] + slates[i : i + 600]
    assert len(_fold_all(fetches)) == cfg.users * cfg.sessions * cfg.steps
    assert _fold_all(fetches) == _fold_all(events)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    users=st.integers(1, 2),
    sessions=st.integers(1, 3),
    steps=st.integers(1, 6),
    data=st.data(),
)
def test_any_permutation_gives_the_causal_transitions(seed, users, sessions, steps, data):
    events = causal_events(SyntheticConfig(users=users, sessions=sessions, steps=steps, seed=seed))
    expected = _fold_all(events)
    assert len(expected) == users * sessions * steps
    assert _fold_all(data.draw(st.permutations(events))) == expected


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), dup_rate=st.floats(0.0, 0.5), data=st.data())
def test_any_permutation_with_redeliveries_gives_the_causal_transitions(seed, dup_rate, data):
    events = causal_events(SyntheticConfig(users=2, sessions=2, steps=4, seed=seed))
    expected = _fold_all(events)
    shuffled = data.draw(st.permutations(events))
    rng = random.Random(seed)
    replayed: list[Record] = []
    for event in shuffled:
        replayed.append(event)
        if rng.random() < dup_rate:
            replayed.append(rng.choice(replayed))  # a record already folded comes again
    assert _fold_all(replayed) == expected
