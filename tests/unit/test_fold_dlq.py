"""What the fold cannot keep ends in the dead-letter topic with its reason, never nowhere.

Through both shells of the fold: ``services.fold_step.FoldStep`` on the in-memory bus (the
in-process loop's worker) and ``streams.batch.BatchFolder`` (the faust worker's and the
bench's), whose rejects the faust app dead-letters.
"""

from __future__ import annotations

import msgspec

from recloop.core import codec
from recloop.core.dlq import HEADER_ERROR, HEADER_OFFSET, parse_headers
from recloop.core.events import Click, Feedback, Record, SessionEnd, SessionState, SlateServed
from recloop.core.membus import MemoryBus
from recloop.core.settings import Settings
from recloop.services.fold_step import FoldStep
from recloop.streams import fold
from recloop.streams.batch import BatchFolder, RawRecord, decode_state
from recloop.streams.synthetic import SyntheticConfig, causal_events, slate_feedback, split_topics

U = "u1"
SETTINGS = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="fold-dlq.")
TOPICS = SETTINGS.topics
SMALL = fold.FoldConfig(early_feedback=4)


def _slate(rid: str, step: int) -> SlateServed:
    return SlateServed(
        request_id=rid, user_id=U, session_id="s1", step=step, ts=100.0 + step,
        request_ts=100.0 + step, items=[10, 11, 12], scores=[0.0] * 3, propensities=[0.5] * 3,
        policy="p", policy_version=1,
    )  # fmt: skip


def _session() -> tuple[list[Record], list[Record]]:
    """Two slates, then their feedback (r0 clicked; 4 + 3 records) and the end."""
    feedback = [
        *slate_feedback(U, "s1", "r0", [10, 11, 12], 1, 2.0, 110.0),
        *slate_feedback(U, "s1", "r1", [10, 11, 12], None, 0.0, 111.0),
        SessionEnd(event_id="s1-end", user_id=U, session_id="s1", steps=2, ts=112.0),
    ]
    return [_slate("r0", 0), _slate("r1", 1)], feedback


def _publish(bus: MemoryBus, topic: str, records: list[Record]) -> None:
    for record in records:
        bus.publish(topic, U.encode(), codec.encode(record))


def _letters(bus: MemoryBus) -> list[tuple[Feedback, dict[str, str]]]:
    return [
        (codec.decode(m.value, Feedback), parse_headers(list(m.headers)))
        for m in bus.records(TOPICS.dlq(TOPICS.feedback))
    ]


def test_fold_step_dead_letters_early_feedback_that_overflows_the_buffer():
    bus = MemoryBus()
    step = FoldStep(SETTINGS, bus, config=SMALL)
    slates, feedback = _session()
    _publish(bus, TOPICS.feedback, feedback)  # the feedback topic ran ahead of the slates
    assert step.step() == len(feedback)
    letters = _letters(bus)
    assert [f for f, _ in letters] == feedback[4:]  # r0's four records were room enough
    for refused, headers in letters:
        assert headers[HEADER_ERROR] == (
            f"{type(refused).__name__} {refused.event_id}: 4 feedback records already wait "
            f"for their slates for user {U} (buffer full: early_feedback=4)"
        )
    _publish(bus, TOPICS.slates, slates)
    step.step()
    [transition] = [codec.decode(m.value, fold.Transition) for m in bus.records(TOPICS.transitions)]
    assert (transition.request_id, transition.reward, transition.done) == ("r0", 2.0, False)
    # r1's outcome went to the DLQ: the state still holds r1, unanswered, for expiry to count.
    state = codec.decode(bus.records(TOPICS.session_state)[-1].value, SessionState)
    assert fold.unanswered(state) == 1 and state.early_feedback == []


def test_fold_step_dead_letters_buffered_feedback_that_contradicts_its_slate():
    bus = MemoryBus()
    step = FoldStep(SETTINGS, bus)
    slates, feedback = _session()
    wrong = Click(event_id="bad", user_id=U, session_id="s1", request_id="r1", item=99,
                  position=2, reward=5.0, ts=111.0)  # fmt: skip
    _publish(bus, TOPICS.feedback, [*feedback, wrong])
    step.step()
    assert _letters(bus) == []  # it could not be checked yet
    _publish(bus, TOPICS.slates, slates)
    step.step()
    [(letter, headers)] = _letters(bus)
    assert letter == wrong and headers[HEADER_OFFSET] == "-1"
    assert headers[HEADER_ERROR] == (
        "Click bad: item 99 at position 2 is not in slate r1 (it arrived before the slate)"
    )
    transitions = [codec.decode(m.value, fold.Transition) for m in bus.records(TOPICS.transitions)]
    assert [(t.request_id, t.done) for t in transitions] == [("r0", False), ("r1", True)]
    assert step.states[U].ended and step.states[U].early_feedback == []


def _raw(records: list[Record], topic: str, start: int = 0) -> list[RawRecord]:
    return [
        RawRecord(topic, 0, start + i, r.user_id.encode(), codec.encode(r))
        for i, r in enumerate(records)
    ]


def test_batch_folder_rejects_overflow_and_contradicting_buffered_feedback():
    folder = BatchFolder(TOPICS.slates, TOPICS.feedback, fold.FoldConfig(early_feedback=5))
    slates, feedback = _session()
    wrong = msgspec.structs.replace(feedback[0], event_id="bad", item=99)  # r0 position 0
    first = folder.fold(_raw([wrong, *feedback], TOPICS.feedback), {}.get)
    # Five wait (the wrong one and r0's four); the rest is refused, each with its offset.
    assert [(r.offset, reason.split(":")[0]) for r, reason in first.rejects] == [
        (5, "Impression r1-i0"), (6, "Impression r1-i1"), (7, "Impression r1-i2"),
        (8, "SessionEnd s1-end"),
    ]  # fmt: skip
    assert all("(buffer full: early_feedback=5)" in reason for _, reason in first.rejects)
    [(_, _, state)] = first.states.values()
    second = folder.fold(_raw(slates, TOPICS.slates), {U.encode(): state}.get)
    [(record, reason)] = second.rejects
    assert (record.topic, record.offset, codec.decode(record.value, Feedback)) == (
        TOPICS.feedback, -1, wrong,
    )  # fmt: skip
    assert reason == (
        "Impression bad: item 99 at position 0 is not in slate r0 (it arrived before the slate)"
    )
    assert [t.request_id for _, _, t in second.transitions] == ["r0"]
    [(_, raw, state)] = second.states.values()
    assert state.early_feedback == [] and decode_state(raw) == state


def test_batch_folder_over_topic_grouped_fetches_emits_every_transition():
    """A backlog read as the worker reads it: each fetch all feedback, then all slates."""
    cfg = SyntheticConfig(users=8, sessions=1, steps=40, seed=5)
    events = causal_events(cfg)
    slates, feedback = split_topics(events)
    folder = BatchFolder(TOPICS.slates, TOPICS.feedback, fold.DEFAULT)
    stored: dict[bytes, bytes] = {}
    got: dict[str, fold.Transition] = {}
    n = 4  # fetches; the slates topic is read one fetch behind the feedback topic
    feedback_cuts = [len(feedback) * j // n for j in range(n + 1)]
    slates_cuts = [0, *(len(slates) * j // n for j in range(n + 1))]
    for j in range(n + 1):
        fetch = _raw(feedback[feedback_cuts[j] : feedback_cuts[j + 1]] if j < n else [],
                     TOPICS.feedback, feedback_cuts[min(j, n)])  # fmt: skip
        fetch += _raw(slates[slates_cuts[j] : slates_cuts[j + 1]], TOPICS.slates, slates_cuts[j])
        result = folder.fold(fetch, stored.get)
        assert result.rejects == []
        stored.update((key, raw) for key, (_, raw, _) in result.states.items())
        for _, _, t in result.transitions:
            assert t.transition_id not in got
            got[t.transition_id] = t
    assert len(got) == cfg.users * cfg.steps
    assert all(decode_state(raw).ended for raw in stored.values())


def test_an_expired_sessions_buffered_feedback_comes_out_as_rejects_for_the_sweep():
    folder = BatchFolder(TOPICS.slates, TOPICS.feedback, fold.DEFAULT)
    slates, feedback = _session()
    # r0's feedback and r1's slate were lost upstream.
    records = _raw(slates[:1], TOPICS.slates) + _raw(feedback[4:7], TOPICS.feedback)
    result = folder.fold(records, {}.get)
    [(partition, _, state)] = result.states.values()
    assert fold.unanswered(state) == 1
    ended, out = fold.expire(state, now=1e9, timeout_s=60.0)
    assert ended.ended and out == []
    rejects: list[tuple[RawRecord, str]] = []
    ended = folder.take_rejected(U.encode(), partition, ended, rejects)
    assert [(r.offset, codec.decode(r.value, Feedback)) for r, _ in rejects] == [
        (-1, f) for f in feedback[4:7]
    ]
    assert rejects[0][1] == "Impression r1-i0: session s1 ended before slate r1 arrived"
    assert ended.early_feedback == []
