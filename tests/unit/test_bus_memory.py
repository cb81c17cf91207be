"""The in-memory bus: key partitioning, per-group offsets, determinism, and the Reader's
dead-letter and commit rules over it (the same code the Kafka bus runs)."""

from __future__ import annotations

import pytest

from recloop.core import codec
from recloop.core.dlq import HEADER_ERROR, HEADER_OFFSET, HEADER_PARTITION, parse_headers
from recloop.core.events import SessionEnd
from recloop.core.membus import DeliveryFailed, MemoryBus, partition_of
from recloop.core.ports import Bus, BusConsumer
from recloop.core.topics import Topics
from recloop.kafka.deadletter import DeadLetterLost, Reader

TOPICS = Topics()


def _end(user: str, i: int = 0) -> bytes:
    return codec.encode(SessionEnd(event_id=f"e{i}", user_id=user, session_id=f"s{i}", steps=1, ts=float(i)))


def test_it_implements_the_bus_port() -> None:
    bus = MemoryBus()
    assert isinstance(bus, Bus)
    assert isinstance(bus.subscribe(["t"], "g"), BusConsumer)


def test_a_key_always_lands_on_the_same_partition_and_offsets_count_up() -> None:
    bus = MemoryBus(partitions=4)
    for i in range(5):
        bus.publish("a", b"u1", b"%d" % i)
        bus.publish("b", b"u1", b"%d" % i)
    p = partition_of(b"u1", 4)
    assert [(m.partition, m.offset) for m in bus.records("a")] == [(p, i) for i in range(5)]
    assert {m.partition for m in bus.records("b")} == {p}  # co-partitioned across topics
    assert len({partition_of(f"u{i}".encode(), 4) for i in range(50)}) == 4


def test_groups_keep_their_own_committed_offsets() -> None:
    bus = MemoryBus(partitions=2)
    for i in range(6):
        bus.publish("t", f"u{i}".encode(), b"%d" % i)
    first = bus.subscribe(["t"], "g1")
    got = first.poll(4, 0)
    assert len(got) == 4
    first.commit({(m.topic, m.partition): m.offset + 1 for m in got})
    first.close()
    # The same group resumes after its commit; another group starts from the beginning.
    assert len(bus.subscribe(["t"], "g1").poll(100, 0)) == 2
    assert len(bus.subscribe(["t"], "g2").poll(100, 0)) == 6
    # from_end skips what is there; start_at overrides per partition.
    assert bus.subscribe(["t"], "g3", from_end=True).poll(100, 0) == []
    again = bus.subscribe(["t"], "g3", start_at=lambda t, p: 0 if p == 0 else None)
    assert {m.partition for m in again.poll(100, 0)} == {0}


def test_polls_are_deterministic() -> None:
    def run() -> list[tuple[int, int, bytes]]:
        bus = MemoryBus(partitions=3)
        for i in range(20):
            bus.publish("t", f"u{i % 7}".encode(), b"%d" % i)
        consumer = bus.subscribe(["t"], "g")
        out = []
        while batch := consumer.poll(3, 0):
            out += [(m.partition, m.offset, m.value) for m in batch]
        return out

    assert run() == run() and len(run()) == 20


def test_the_reader_dead_letters_what_does_not_decode_with_the_dlq_headers() -> None:
    bus = MemoryBus(partitions=1)
    feedback = TOPICS.feedback
    bus.publish(feedback, b"u1", _end("u1", 0))
    bus.publish(feedback, b"u1", b"not msgpack")
    bus.publish(feedback, b"u1", _end("u1", 2))
    reader = Reader(bus, TOPICS, ["rec.feedback"], "g", "test:reader")
    got = reader.poll_batch(10, 0)
    assert [c.offset for c in got] == [0, 2]
    [letter] = bus.records(TOPICS.dlq(feedback))
    headers = parse_headers(list(letter.headers))
    assert letter.value == b"not msgpack" and letter.key == b"u1"
    assert (headers[HEADER_PARTITION], headers[HEADER_OFFSET]) == ("0", "1")
    assert headers[HEADER_ERROR]
    assert reader.commit() == {(feedback, 0): 3}
    assert bus.committed["g"] == {(feedback, 0): 3}


def test_a_commit_is_refused_while_a_dead_letter_is_unconfirmed() -> None:
    bus = MemoryBus(partitions=1)
    bus.publish(TOPICS.feedback, b"u1", _end("u1"))
    reader = Reader(bus, TOPICS, ["rec.feedback"], "g", "test")
    [item] = reader.poll_batch(10, 0)
    reader.dead_letter(item, "cannot use it")
    assert reader.dlq_pending
    bus.fail_next("the broker lost it")
    with pytest.raises(DeadLetterLost) as info:
        reader.commit()
    assert isinstance(info.value.__cause__, DeliveryFailed)  # the bus said why
    assert "g" not in bus.committed or bus.committed["g"] == {}
    [letter] = bus.records(TOPICS.dlq(TOPICS.feedback))
    assert codec.decode(letter.value, SessionEnd).user_id == "u1"  # re-encoded, same content
