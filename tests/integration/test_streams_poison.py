"""Poison records on a live streams worker: dead-lettered, and the worker keeps running.

Issue 12, findings 1 and 2: a 2.1 kB record with a 996-deep array in an unknown field made
the decode raise ``RecursionError`` out of the worker's fold, and the dead letter of a record
of about the broker's size limit was over faust's 1,000,000-byte producer limit; either one
stopped the worker, and a restarted one met the same record again. Here both kinds go, on
``rec.slates`` and on ``rec.feedback``, between valid traffic (the large one is bad only at
its very end, found by a full parse; valid users' keys, so they sit in the same partitions
as valid records before and after them). The one worker process must
keep running (same pid, never exited), each poison record must be in its topic's DLQ with a
reason (the large ones truncated, with their original size in a header), every valid
record's transition must arrive, and the group's commits must reach the log end.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import ConfigResource, ResourceType

from recloop.core import codec
from recloop.core.dlq import (
    HEADER_ERROR,
    HEADER_ORIGINAL_SIZE,
    HEADER_TOPIC,
    TRUNCATED_BYTES,
    parse_headers,
)
from recloop.core.events import SlateServed
from recloop.core.settings import Settings
from recloop.kafka.clients import (
    DeliveryTracker,
    flush_or_raise,
    make_admin,
    make_consumer,
    make_producer,
)
from recloop.ops.chaos_readback import behind
from recloop.streams.synthetic import causal_events
from tests.integration.test_streams_kafka import (
    WORKLOAD,
    TransitionReader,
    assert_exactly,
    expected,
    produce,
    workers,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.integration

DEEP = b"[" * 996 + b"]" * 996


def broker_message_max_bytes(settings: Settings) -> int:
    """The broker's ``message.max.bytes``: the largest record batch it accepts."""
    admin = make_admin(settings)
    metadata = admin.list_topics(timeout=30)
    broker = ConfigResource(ResourceType.BROKER, str(next(iter(metadata.brokers))))
    configs = admin.describe_configs([broker])[broker].result(timeout=30)
    return int(configs["message.max.bytes"].value)


def with_unknown_field(value: bytes, field: bytes) -> bytes:
    return value[:-1] + b',"zz":' + field + b"}"


def test_poison_records_are_dead_lettered_and_the_worker_keeps_running(kafka_settings, workers):  # noqa: F811
    events = causal_events(WORKLOAD)
    want = expected(events)
    topics = kafka_settings.topics
    limit = broker_message_max_bytes(kafka_settings)
    # The largest record the broker takes: its value, key and a record batch's framing.
    big_size = limit - 1000
    slate = next(e for e in events if isinstance(e, SlateServed) and e.user_id == "u3")
    click = next(e for e in events if type(e).__name__ == "Click" and e.user_id == "u5")

    def big(value: bytes) -> bytes:
        # A bad record (its closing brace broken) that only a full parse would find bad.
        padding = big_size - len(with_unknown_field(value, b'""'))
        return with_unknown_field(value, b'"' + b"x" * padding + b'"')[:-1] + b"!"

    poison = {
        (topics.slates, "deep"): (b"u3", with_unknown_field(codec.encode(slate), DEEP)),
        (topics.slates, "big"): (b"u3", big(codec.encode(slate))),
        (topics.feedback, "deep"): (b"u5", with_unknown_field(codec.encode(click), DEEP)),
        (topics.feedback, "big"): (b"u5", big(codec.encode(click))),
    }
    assert all(2000 < len(v) < 2600 for (_, kind), (_, v) in poison.items() if kind == "deep")
    assert all(len(v) == big_size for (_, kind), (_, v) in poison.items() if kind == "big")

    half = len(events) // 2
    produce(kafka_settings, events[:half])
    producer, tracker = (
        make_producer(kafka_settings, {"message.max.bytes": limit}),
        DeliveryTracker(),
    )
    for (topic, _), (key, value) in poison.items():
        producer.produce(topic, value=value, key=key, on_delivery=tracker)
    flush_or_raise(producer, tracker)
    produce(kafka_settings, events[half:])

    app_id = f"{kafka_settings.topic_prefix}streams"
    worker = workers.start(kafka_settings, app_id, "poisoned")
    pid = worker.pid
    inputs = [topics.slates, topics.feedback]
    reader = TransitionReader(kafka_settings, "check")
    try:
        reader.read_until(set(want), timeout=90)
        deadline = time.monotonic() + 60
        lag, where = behind(kafka_settings, app_id, inputs)
        while lag != 0 and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(1)
            lag, where = behind(kafka_settings, app_id, inputs)
    finally:
        reader.close()
    assert worker.poll() is None and worker.pid == pid, f"the worker exited\n{workers.logs()}"
    assert_exactly(reader, want, workers)
    assert lag == 0, f"the group is {where} behind\n{workers.logs()}"

    dlq = make_consumer(kafka_settings, "dlq-check")
    dlq.subscribe([topics.dlq(topics.slates), topics.dlq(topics.feedback)])
    dead = []
    deadline = time.monotonic() + 30
    while len(dead) < len(poison) and time.monotonic() < deadline:
        dead += [m for m in dlq.consume(10, 0.5) if m.error() is None]
    dlq.close()
    assert len(dead) == len(poison), [(m.topic(), m.key()) for m in dead]
    for m in dead:
        headers = parse_headers(m.headers())
        source = headers[HEADER_TOPIC]
        assert m.topic() == topics.dlq(source) and headers[HEADER_ERROR]
        value = m.value() or b""
        kind = "big" if HEADER_ORIGINAL_SIZE in headers else "deep"
        key, original = poison[(source, kind)]
        assert m.key() == key
        if kind == "big":
            assert headers[HEADER_ORIGINAL_SIZE] == str(big_size)
            assert value == original[:TRUNCATED_BYTES]
        else:
            assert value == original
    kinds = sorted((parse_headers(m.headers())[HEADER_TOPIC], HEADER_ORIGINAL_SIZE in
                    parse_headers(m.headers())) for m in dead)  # fmt: skip
    assert kinds == sorted((t, k == "big") for t, k in poison)
    print(
        f"\npoison: {len(poison)} injected ({big_size:,} B big, {len(poison[(topics.slates, 'deep')][1]):,} B deep), "
        f"dead-lettered {sum(m.topic() == topics.dlq(topics.slates) for m in dead)} on slates, "
        f"{sum(m.topic() == topics.dlq(topics.feedback) for m in dead)} on feedback; "
        f"{len(want)} transitions from {half} records before and {len(events) - half} after; "
        f"worker restarts 0 (pid {pid}); group lag {lag}; broker message.max.bytes {limit:,}"
    )
