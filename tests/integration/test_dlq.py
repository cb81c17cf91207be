"""The dead-letter consumer against the real broker: bad records go aside, good ones flow on."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import TopicPartition

from recloop.core import codec, events
from recloop.core.dlq import (
    HEADER_CONSUMER,
    HEADER_ERROR,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    parse_headers,
)
from recloop.core.settings import Settings
from recloop.kafka.clients import make_consumer, make_producer
from recloop.kafka.dlq import DeadLetterConsumer

pytestmark = pytest.mark.integration


def _click(i: int) -> events.Click:
    return events.Click(
        event_id=f"e-{i}", user_id="u-7", session_id="s-1", request_id=f"r-{i}",
        item=i, position=0, reward=float(i), ts=1_700_000_000.0 + i,
    )  # fmt: skip


BAD_VALUES = [
    b"{not json",
    b'{"type":"Click","v":1,"event_id":"x"}',  # missing fields
    codec.encode(_click(99)).replace(b'"reward":99.0', b'"reward":NaN'),
    codec.encode(_click(98)).replace(b'"v":2', b'"v":42'),  # unknown schema version
]
# What each dead letter's error header must name, in the order of BAD_VALUES.
BAD_REASONS = ["malformed JSON", "missing required field", "malformed JSON", "schema version 42"]


def _drain(consumer: DeadLetterConsumer, want: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got.extend(consumer.poll_batch(50, timeout=0.5))
    return got


def test_malformed_records_go_to_the_dlq_and_nothing_valid_is_lost(kafka_settings: Settings):
    topic = kafka_settings.topics.feedback
    producer = make_producer(kafka_settings)
    # One partition, so the order "valid, bad, valid, ..." is the order the consumer sees.
    values: list[bytes] = []
    bad_iter = iter(BAD_VALUES)
    for i in range(12):
        values.append(codec.encode(_click(i)))
        if i % 3 == 1:
            values.append(next(bad_iter))
    bad_sent = [v for v in values if v in BAD_VALUES]
    for v in values:
        producer.produce(topic, key=b"u-7", value=v, partition=2)
    assert producer.flush(10) == 0

    group = f"{kafka_settings.topic_prefix}dlq"
    with DeadLetterConsumer(kafka_settings, ["rec.feedback"], group, name="test-dlq") as consumer:
        got = _drain(consumer, want=12)
        committed = consumer.commit()
        assert consumer.stats.returned == 12
        assert consumer.stats.dead_lettered == len(bad_sent)
    assert [c.value for c in got] == [_click(i) for i in range(12)]
    assert [c.offset for c in got] == [i for i, v in enumerate(values) if v not in BAD_VALUES]
    assert committed == {(topic, 2): len(values)}

    dead = _read_all(kafka_settings, kafka_settings.topics.dlq(topic), len(bad_sent))
    assert [m.value() for m in dead] == bad_sent
    bad_offsets = [i for i, v in enumerate(values) if v in BAD_VALUES]
    for msg, offset, reason in zip(dead, bad_offsets, BAD_REASONS, strict=True):
        headers = parse_headers(msg.headers())
        assert msg.key() == b"u-7"
        assert headers[HEADER_TOPIC] == topic
        assert headers[HEADER_PARTITION] == "2"
        assert headers[HEADER_OFFSET] == str(offset)
        assert headers[HEADER_CONSUMER] == "test-dlq"
        assert headers[HEADER_ERROR].startswith("cannot decode") and reason in headers[HEADER_ERROR]

    # The group's committed position is past the last record, bad ones included.
    check = make_consumer(kafka_settings, group)
    [tp] = check.committed([TopicPartition(topic, 2)], timeout=10)
    check.close()
    assert tp.offset == len(values)


def test_a_restarted_consumer_resumes_after_its_commit(kafka_settings: Settings):
    topic = kafka_settings.topics.feedback
    producer = make_producer(kafka_settings)
    for i in range(6):
        producer.produce(topic, key=b"u-7", value=codec.encode(_click(i)), partition=0)
    assert producer.flush(10) == 0
    group = f"{kafka_settings.topic_prefix}resume"

    with DeadLetterConsumer(kafka_settings, ["rec.feedback"], group, name="c1") as first:
        got = _drain(first, want=6)
        first.commit()
    assert len(got) == 6

    producer.produce(topic, key=b"u-7", value=b"garbage", partition=0)
    producer.produce(topic, key=b"u-7", value=codec.encode(_click(6)), partition=0)
    assert producer.flush(10) == 0
    with DeadLetterConsumer(kafka_settings, ["rec.feedback"], group, name="c2") as second:
        again = _drain(second, want=1)
        second.commit()
        assert second.stats.dead_lettered == 1
    assert [c.value for c in again] == [_click(6)]


def _read_all(settings: Settings, topic: str, want: int, timeout: float = 20.0) -> list:
    consumer = make_consumer(settings, f"{settings.topic_prefix}reader")
    consumer.assign([TopicPartition(topic, 0, 0)])
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            out.append(msg)
    # Nothing beyond what was dead-lettered.
    extra = consumer.poll(1.0)
    consumer.close()
    assert extra is None or extra.error() is not None
    return out
