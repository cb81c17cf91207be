"""The Reader under hostile records and a bus that refuses dead letters (issue 12, finding 2).

A bad record too large for a whole dead letter goes truncated with its size; a dead letter
the bus refuses even truncated holds the reader at that record (nothing after it is lost or
committed past) until the bus takes it; a dead letter the bus did not acknowledge stops all
later commits.
"""

from __future__ import annotations

import pytest

from recloop.core import codec, events, topics
from recloop.core.dlq import HEADER_ORIGINAL_SIZE, MAX_RECORD_BYTES, TRUNCATED_BYTES, parse_headers
from recloop.core.membus import MemoryBus
from recloop.kafka.deadletter import DeadLetterLost, Reader

TOPICS = topics.Topics()


def _click(i: int) -> bytes:
    return codec.encode(events.Click(
        event_id=f"e-{i}", user_id="u-1", session_id="s-1", request_id=f"r-{i}", item=i,
        position=0, reward=1.0, ts=1.0,
    ))  # fmt: skip


class RefusingBus(MemoryBus):
    """A MemoryBus whose dead-letter publish refuses values over ``limit`` at once (as
    librdkafka refuses a message over its ``message.max.bytes``), or everything."""

    def __init__(self, limit: int) -> None:
        super().__init__(partitions=1)
        self.limit = limit

    def publish(self, topic, key, value, headers=()):  # type: ignore[no-untyped-def]
        if headers and len(value) > self.limit:
            raise RuntimeError(f"KafkaError MSG_SIZE_TOO_LARGE: {len(value)} > {self.limit}")
        super().publish(topic, key, value, headers)


def _read_all(reader: Reader, polls: int = 10) -> list[events.Record]:
    got = []
    for _ in range(polls):
        got += [c.value for c in reader.poll_batch(100, 0)]
    return got


def test_a_refused_whole_dead_letter_goes_truncated_and_the_next_record_is_returned() -> None:
    bus = RefusingBus(limit=100_000)
    feedback = TOPICS.feedback
    big_bad = b'{"type":"Click","v":1,"pad":"' + b"p" * 500_000 + b"}"  # malformed, 500 kB
    for value in (_click(0), big_bad, _click(1), b"x" * (MAX_RECORD_BYTES + 1), _click(2)):
        bus.publish(feedback, b"u-1", value)
    reader = Reader(bus, TOPICS, ["rec.feedback"], "g", "test:reader")
    got = _read_all(reader)
    assert [r.item for r in got] == [0, 1, 2]  # type: ignore[attr-defined]
    letters = bus.records(TOPICS.dlq(feedback))
    assert [parse_headers(list(m.headers)).get(HEADER_ORIGINAL_SIZE) for m in letters] == [
        str(len(big_bad)), str(MAX_RECORD_BYTES + 1)]  # fmt: skip
    assert all(len(m.value) <= TRUNCATED_BYTES for m in letters)
    assert reader.commit() == {(feedback, 0): 5}


def test_a_dead_letter_refused_even_truncated_holds_the_reader_at_its_record() -> None:
    bus = RefusingBus(limit=-1)  # every dead letter refused
    feedback = TOPICS.feedback
    for value in (_click(0), b"{bad", _click(1), _click(2)):
        bus.publish(feedback, b"u-1", value)
    reader = Reader(bus, TOPICS, ["rec.feedback"], "g", "test:reader")
    first = _read_all(reader, polls=3)
    assert [r.item for r in first] == [0]  # type: ignore[attr-defined]
    assert reader.stats.errors >= 2 and "refused" in (reader.stats.last_error or "")
    assert reader.commit() == {(feedback, 0): 1}, "never past the record not handled"
    bus.limit = 10**9  # the bus takes dead letters again
    assert [r.item for r in _read_all(reader)] == [1, 2]  # type: ignore[attr-defined]
    assert reader.commit() == {(feedback, 0): 4}
    assert [m.value for m in bus.records(TOPICS.dlq(feedback))] == [b"{bad"]


def test_an_unacknowledged_dead_letter_stops_every_later_commit() -> None:
    bus = MemoryBus(partitions=1)
    feedback = TOPICS.feedback
    for value in (b"{bad", _click(0)):
        bus.publish(feedback, b"u-1", value)
    reader = Reader(bus, TOPICS, ["rec.feedback"], "g", "test:reader")
    assert len(_read_all(reader)) == 1
    bus.fail_next("the broker lost it")
    with pytest.raises(DeadLetterLost):
        reader.commit()
    with pytest.raises(DeadLetterLost):
        reader.commit()  # a second try must not commit past the lost dead letter
