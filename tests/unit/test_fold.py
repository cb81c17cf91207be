"""The session fold: events in, exact transitions out, for every ordering the topics allow."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recloop.core import codec
from recloop.core.events import Click, Record, SessionEnd, SessionState, SlateServed, UserView
from recloop.streams import fold
from recloop.streams.synthetic import SyntheticConfig, causal_events, slate_feedback, split_topics

U = "u1"


def slate(rid: str, step: int, items=(10, 11, 12), sid: str = "s1", ts: float = 0.0):
    return SlateServed(
        request_id=rid, user_id=U, session_id=sid, step=step, ts=ts or 100.0 + step,
        request_ts=ts or 100.0 + step, items=list(items), scores=[0.0] * len(items),
        propensities=[0.5] * len(items), policy="p", policy_version=3,
        candidates=sorted(items), observation=[float(step)],
    )  # fmt: skip


def answer(rid: str, items=(10, 11, 12), clicked: int | None = None, reward: float = 0.0,
           sid: str = "s1", ts: float = 200.0) -> list[Record]:  # fmt: skip
    """A slate's feedback as the simulator sends it: impressions, then the click if any."""
    return slate_feedback(U, sid, rid, list(items), clicked, reward, ts)


def end(steps: int, sid: str = "s1", ts: float = 300.0) -> SessionEnd:
    return SessionEnd(event_id=f"{sid}-end", user_id=U, session_id=sid, steps=steps, ts=ts)


def run(events: list[Record], state: SessionState | None = None, config=fold.DEFAULT):
    out = []
    for event in events:
        state, more = fold.apply(state, event, config)
        out += more
    return state, out


def two_step_session() -> list[Record]:
    """r0 clicked at position 1 (reward 2.5), r1 not clicked, then the session ends."""
    return [
        slate("r0", 0), *answer("r0", clicked=1, reward=2.5),
        slate("r1", 1, items=(20, 21, 22)), *answer("r1", items=(20, 21, 22)),
        end(2),
    ]  # fmt: skip


def test_a_session_yields_one_exact_transition_per_answered_slate():
    _, out = run(two_step_session())
    assert [t.request_id for t in out] == ["r0", "r1"]
    t0, t1 = out
    assert t0.transition_id == fold.transition_id(U, "s1", "r0")
    assert t0.state == UserView(observation=[0.0])
    assert (t0.slate, t0.chosen_item, t0.chosen_position, t0.reward) == ([10, 11, 12], 11, 1, 2.5)
    assert (t0.propensities, t0.candidates, t0.policy, t0.policy_version) == (
        [0.5] * 3, [10, 11, 12], "p", 3,
    )  # fmt: skip
    assert t0.next_state == UserView(
        observation=[1.0], history=[11], history_rewards=[2.5], step=1, cumulative_reward=2.5
    )
    assert (t0.next_slate, t0.next_candidates, t0.done) == ([20, 21, 22], [20, 21, 22], False)
    assert (t0.served_ts, t0.outcome_ts) == (100.0, 200.0)
    # The no-click step: reward 0, no chosen item, history unchanged, and it is terminal.
    assert t1.state == t0.next_state
    assert (t1.chosen_item, t1.chosen_position, t1.reward, t1.done) == (None, None, 0.0, True)
    assert t1.next_state == UserView(
        observation=[1.0], history=[11], history_rewards=[2.5], step=2, cumulative_reward=2.5
    )
    assert (t1.next_slate, t1.next_candidates) == ([], [])


def test_a_transition_waits_for_its_successor_but_the_view_does_not():
    state, out = run([slate("r0", 0), *answer("r0", clicked=0, reward=1.0)])
    assert out == []  # the next observation and slate are not known yet
    assert state.view.history == [10] and state.view.step == 1  # serving sees it at once
    state, out = run([slate("r1", 1)], state)
    assert [t.request_id for t in out] == ["r0"]


def test_duplicates_change_nothing():
    events = two_step_session()
    _, expected = run(events)
    doubled = [e for event in events for e in (event, event)]
    _, out = run(doubled)
    assert out == expected
    state, out = run(events[:4])
    again, more = run([events[0], events[1]], state)  # the same slate and impression again
    assert (again, more) == (state, [])


def test_repeats_of_an_answered_slate_are_dropped_not_buffered():
    events = two_step_session()
    state, out = run(events[:6])  # r0 answered and r1 served: r0's transition is out
    assert [t.request_id for t in out] == ["r0"] and state.done_requests == ["r0"]
    again, more = run(events[:5], state)  # r0's slate and all its feedback once more
    assert (again, more) == (state, [])


def test_feedback_before_its_slate_is_replayed_when_the_slate_arrives():
    events = two_step_session()
    _, expected = run(events)
    reordered = [*answer("r0", clicked=1, reward=2.5), slate("r0", 0), *events[5:]]
    _, out = run(reordered)
    assert out == expected


def test_next_slate_before_the_previous_feedback():
    events = two_step_session()
    _, expected = run(events)
    slates = [e for e in events if isinstance(e, SlateServed)]
    feedback = [e for e in events if not isinstance(e, SlateServed)]
    state, out = run(slates + feedback[:3])  # r0 has impressions but not its click yet
    assert out == []
    state, out = run(feedback[3:4], state)  # the click completes r0; r1 is its successor
    assert [t.request_id for t in out] == ["r0"] and out[0] == expected[0]


def test_session_end_waits_for_the_outcomes_it_counts():
    events = two_step_session()
    _, expected = run(events)
    early_end = [*events[:5], events[-1], *events[5:-1]]  # the end overtakes r1 and its answer
    state, out = run(early_end[:6])
    assert out == [] and not state.ended
    _, out = run(early_end[6:], state)
    assert out == expected


def test_events_after_the_session_ended_are_dropped():
    state, _ = run(two_step_session())
    assert state.ended
    late = [slate("r2", 2), *answer("r2", clicked=0, reward=9.0), end(3)]
    after, out = run(late, state)
    assert (after, out) == (state, [])


def test_a_new_session_for_the_same_user_starts_fresh():
    state, first = run(two_step_session())
    second = [
        slate("q0", 0, sid="s2"),
        *answer("q0", clicked=2, reward=4.0, sid="s2"),
        end(1, "s2"),
    ]
    state, out = run(second, state)
    assert [t.transition_id for t in out] == [fold.transition_id(U, "s2", "q0")]
    assert out[0].state == UserView(observation=[0.0])  # no history carried over
    assert out[0].done and out[0].reward == 4.0 and out[0].chosen_item == 12
    assert state.session_id == "s2" and "s1" in state.past_sessions
    # A late event of s1 is recognised as such and ignored.
    assert run([slate("r9", 9)], state) == (state, [])


def test_the_next_sessions_slate_waits_for_the_current_session_to_end():
    first = two_step_session()
    second = [
        slate("q0", 0, sid="s2"),
        *answer("q0", clicked=0, reward=1.0, sid="s2"),
        end(1, "s2"),
    ]
    _, expected = run(first + second)
    # The slates topic ran ahead: s2's slate arrives before s1's last answer and end.
    ahead = [*first[:5], second[0], *first[5:], *second[1:]]
    state, out = run(ahead[:6])
    assert out == [] and state.session_id == "s1" and len(state.parked) == 1
    _, out = run(ahead[6:], state)
    assert out == expected and [t.session_id for t in out] == ["s1", "s1", "s2"]


def test_a_full_parking_refuses_the_next_slate_and_closes_nothing_early():
    config = fold.FoldConfig(parked_slates=2)
    state, _ = run([slate("r0", 0), *answer("r0", clicked=0, reward=1.0)], config=config)
    state, out = run([slate(f"q{step}", step, sid="s2") for step in range(2)], state, config)
    assert out == [] and len(state.parked) == 2
    with pytest.raises(fold.BufferFull, match=r"SlateServed q2 .*parked_slates=2"):
        fold.apply(state, slate("q2", 2, sid="s2"), config)
    # s1 stays open (its end may still be on its way) and ends when the end comes.
    state, out = run([end(1)], state, config)
    assert [(t.session_id, t.request_id, t.done, t.reward) for t in out] == [
        ("s1", "r0", True, 1.0)
    ]
    assert state.session_id == "s2" and [p.request_id for p in state.pending] == ["q0", "q1"]


def test_a_full_early_buffer_refuses_the_next_record_and_keeps_the_state():
    config = fold.FoldConfig(early_feedback=3)
    *impressions, click = answer("r0", clicked=0, reward=1.0)
    state, _ = run(impressions, config=config)
    assert len(state.early_feedback) == 3
    with pytest.raises(fold.BufferFull, match=r"Click r0-c: 3 feedback records .*=3\)"):
        fold.apply(state, click, config)
    # A redelivery of a buffered record is no new record: it is not refused.
    assert fold.apply(state, state.early_feedback[0], config) == (state, [])


def test_inactivity_expiry_emits_the_terminal_transition():
    state, out = run([slate("r0", 0, ts=100.0), *answer("r0", clicked=0, reward=1.5, ts=105.0)])
    assert out == []
    same, out = fold.expire(state, now=105.0 + 59.0, timeout_s=60.0)
    assert (same, out) == (state, [])
    ended, out = fold.expire(state, now=105.0 + 60.0, timeout_s=60.0)
    assert ended.ended and [(t.request_id, t.done, t.reward) for t in out] == [("r0", True, 1.5)]
    assert out[0].next_state.step == 1 and out[0].next_slate == []
    assert fold.expire(ended, now=1e12, timeout_s=60.0) == (ended, [])
    assert run(answer("r0", clicked=0, reward=1.5), ended) == (ended, [])


def test_expiry_chains_past_a_first_slate_that_was_never_answered():
    r1, r2 = (20, 21, 22), (30, 31, 32)
    state, out = run([
        slate("r0", 0, ts=100.0), slate("r1", 1, items=r1, ts=101.0),
        *answer("r1", items=r1, clicked=2, reward=3.0, ts=102.0),
        slate("r2", 2, items=r2, ts=103.0), *answer("r2", items=r2, ts=104.0), end(3, ts=105.0),
    ])  # fmt: skip
    assert out == [] and not state.ended  # r0's outcome holds the chain and the end back
    assert fold.unanswered(state) == 1
    ended, out = fold.expire(state, now=105.0 + 60.0, timeout_s=60.0)
    assert ended.ended and fold.unanswered(ended) == 0
    assert [(t.request_id, t.done) for t in out] == [("r1", False), ("r2", True)]
    t1, t2 = out
    # r1 starts from the view as last known: nothing of r0, the observation r1 was served on.
    assert t1.state == UserView(observation=[1.0])
    assert (t1.chosen_item, t1.reward, t1.next_slate) == (22, 3.0, [30, 31, 32])
    assert t1.next_state == UserView(
        observation=[2.0], history=[22], history_rewards=[3.0], step=1, cumulative_reward=3.0
    )
    assert t2.state == t1.next_state and t2.next_state.step == 2 and t2.next_slate == []
    assert ended.early_feedback == []  # the SessionEnd that waited was applied


def test_expiry_skips_an_unanswered_slate_between_answered_ones():
    state, out = run([
        slate("r0", 0), *answer("r0", clicked=0, reward=1.0),
        slate("r1", 1), slate("r2", 2, items=(30, 31, 32)),
        *answer("r2", items=(30, 31, 32), clicked=1, reward=2.0),
    ])  # fmt: skip
    assert [t.request_id for t in out] == ["r0"]  # r1 was served next: r0's successor
    assert out[0].next_state.observation == [1.0] and out[0].next_slate == [10, 11, 12]
    assert fold.unanswered(state) == 1
    _, out = fold.expire(state, now=1e9, timeout_s=60.0)
    assert [(t.request_id, t.done, t.reward) for t in out] == [("r2", True, 2.0)]
    assert out[0].state == UserView(
        observation=[2.0], history=[10], history_rewards=[1.0], step=1, cumulative_reward=1.0
    )


def test_feedback_waiting_for_its_slate_keeps_its_session_alive():
    state, _ = run(answer("r0", ts=500.0))
    assert state.last_event_ts == 500.0
    assert fold.expire(state, now=520.0, timeout_s=60.0) == (state, [])


def test_buffered_feedback_that_contradicts_its_slate_is_handed_out_with_the_reason():
    wrong = Click(event_id="bad", user_id=U, session_id="s1", request_id="r0", item=99,
                  position=0, reward=1.0, ts=1.0)  # fmt: skip
    state, out = run([*answer("r0", clicked=0, reward=1.0)[:3], wrong, slate("r0", 0)])
    assert out == [] and state.early_feedback == [wrong]  # the right Click is still to come
    waiting, _ = run(answer("r1"))
    assert fold.take_rejected(waiting) == (waiting, [])  # still waiting for its slate
    taken_state, taken = fold.take_rejected(state)
    assert taken_state.early_feedback == [] and taken_state.pending == state.pending
    [(feedback, reason)] = taken
    assert feedback == wrong
    assert reason == (
        "Click bad: item 99 at position 0 is not in slate r0 (it arrived before the slate)"
    )


def test_feedback_whose_session_ended_without_its_slate_is_handed_out():
    stray = answer("r9", ts=150.0)[0]
    state, out = run([slate("r0", 0), *answer("r0", clicked=0, reward=1.0), stray, end(1)])
    assert [t.request_id for t in out] == ["r0"] and state.ended
    state, taken = fold.take_rejected(state)
    assert taken == [(stray, "Impression r9-i0: session s1 ended before slate r9 arrived")]
    assert state.early_feedback == []


def test_feedback_of_a_session_that_was_followed_at_once_is_handed_out_too():
    stray = answer("r9", ts=150.0)[0]
    first = [slate("r0", 0), *answer("r0", clicked=0, reward=1.0), stray]
    state, _ = run([*first, slate("q0", 0, sid="s2"), end(1)])  # s2 starts as s1 ends
    assert state.session_id == "s2" and not state.ended
    state, taken = fold.take_rejected(state)
    assert taken == [(stray, "Impression r9-i0: session s1 ended without slate r9 taking it "
                             "(the slate never came, or contradicted it)")]  # fmt: skip
    assert state.early_feedback == [] and [p.request_id for p in state.pending] == ["q0"]


def test_feedback_that_contradicts_its_slate_is_rejected_and_changes_nothing():
    state, _ = run([slate("r0", 0)])
    wrong_item = Click(event_id="x", user_id=U, session_id="s1", request_id="r0", item=99,
                       position=0, reward=1.0, ts=1.0)  # fmt: skip
    off_slate = msgspec.structs.replace(wrong_item, item=10, position=7)
    for bad in (wrong_item, off_slate):
        with pytest.raises(fold.InvalidEvent):
            fold.apply(state, bad)
    _, out = run([*answer("r0", clicked=0, reward=1.0), end(1)], state)
    assert [t.reward for t in out] == [1.0]


def test_state_survives_the_codec_between_events():
    """The worker stores the state as bytes between batches; that must not change anything."""
    events = causal_events(SyntheticConfig(users=1, sessions=2, steps=3, seed=4))
    _, expected = run(events)
    state, out = None, []
    for event in events:
        state, more = fold.apply(state, event)
        out += more
        state = codec.decode(codec.encode(state), fold.FoldState)
    assert out == expected
    plain = codec.decode(codec.encode(state), SessionState)  # what serving reads
    assert plain == state


def _fold_all(events: list[Record]) -> dict[str, object]:
    states: dict[str, SessionState] = {}
    out = {}
    for event in events:
        states[event.user_id], more = fold.apply(states.get(event.user_id), event)
        for t in more:
            assert t.transition_id not in out, "a transition was emitted twice"
            out[t.transition_id] = t
    return out


def _interleave(a: list, b: list, picks: list[bool]) -> list:
    a, b, out = list(a), list(b), []
    for pick_a in picks:
        if a and (pick_a or not b):
            out.append(a.pop(0))
        elif b:
            out.append(b.pop(0))
    return out + a + b


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    users=st.integers(1, 3),
    sessions=st.integers(1, 3),
    steps=st.integers(1, 3),
    data=st.data(),
)
def test_any_interleaving_of_the_two_topics_gives_the_causal_transitions(
    seed, users, sessions, steps, data
):
    cfg = SyntheticConfig(users=users, sessions=sessions, steps=steps, seed=seed)
    events = causal_events(cfg)
    expected = _fold_all(events)
    assert len(expected) == users * sessions * steps
    slates, feedback = split_topics(events)
    picks = data.draw(st.lists(st.booleans(), min_size=len(events), max_size=len(events)))
    assert _fold_all(_interleave(slates, feedback, picks)) == expected


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), dup_rate=st.floats(0.0, 0.5))
def test_redelivered_events_give_the_same_transitions(seed, dup_rate):
    """At-least-once delivery: some events come again later (each topic stays in order)."""
    events = causal_events(SyntheticConfig(users=2, sessions=2, steps=3, seed=seed))
    expected = _fold_all(events)
    rng = random.Random(seed)
    replayed = []
    for i, event in enumerate(events):
        replayed.append(event)
        if rng.random() < dup_rate:
            replayed.extend(events[max(0, i - 5) : i + 1])  # a redelivered window
    assert _fold_all(replayed) == expected
