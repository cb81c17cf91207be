"""The dead-letter consumer against the real broker under the issue's poison records
(issue 12, findings 1-2): a 1,000,000-byte bad record and a 2.1 kB record with a 996-deep
array, each between valid ones, on one partition.

Before the fix the deep record raised ``RecursionError`` out of ``poll_batch``, and the big
one's dead letter was refused by librdkafka (``MSG_SIZE_TOO_LARGE``) after the consumer's
position had moved past the next valid record, which was never returned.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import TopicPartition

from recloop.core import codec, events
from recloop.core.dlq import (
    BROKER_MESSAGE_MAX_BYTES,
    HEADER_ERROR,
    HEADER_OFFSET,
    HEADER_ORIGINAL_SIZE,
    TRUNCATED_BYTES,
    parse_headers,
)
from recloop.core.settings import Settings
from recloop.kafka.clients import make_consumer, make_producer
from recloop.kafka.dlq import DeadLetterConsumer

pytestmark = pytest.mark.integration


def _click(i: int) -> bytes:
    return codec.encode(events.Click(
        event_id=f"e-{i}", user_id="u-7", session_id="s-1", request_id=f"r-{i}",
        item=i, position=0, reward=1.0, ts=1_700_000_000.0 + i,
    ))  # fmt: skip


BIG = b'{"type":"Click","v":1,"pad":"' + b"p" * (1_000_000 - 31) + b'"}'
DEEP = b'{"type":"Click","v":1,"junk":' + b"[" * 996 + b"]" * 996 + b"}"


def test_a_huge_and_a_deep_bad_record_are_dead_lettered_and_the_next_valid_ones_returned(
    kafka_settings: Settings,
) -> None:
    assert len(BIG) == 1_000_000 and len(DEEP) > 2_000
    topic = kafka_settings.topics.feedback
    producer = make_producer(kafka_settings, {"message.max.bytes": BROKER_MESSAGE_MAX_BYTES})
    values = [_click(0), BIG, _click(1), DEEP, _click(2)]
    for value in values:
        producer.produce(topic, key=b"u-7", value=value, partition=1)
    assert producer.flush(30) == 0

    group = f"{kafka_settings.topic_prefix}hostile"
    with DeadLetterConsumer(kafka_settings, ["rec.feedback"], group, name="test-hostile") as c:
        got: list = []
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            got += c.poll_batch(50, timeout=0.5)
        committed = c.commit()
        assert c.stats.dead_lettered == 2
    assert [m.offset for m in got] == [0, 2, 4]
    assert committed == {(topic, 1): 5}

    dlq = kafka_settings.topics.dlq(topic)
    reader = make_consumer(kafka_settings, f"{kafka_settings.topic_prefix}dlq-reader")
    reader.assign([TopicPartition(dlq, p, 0) for p in
                   reader.list_topics(dlq, timeout=10).topics[dlq].partitions])  # fmt: skip
    letters = []
    deadline = time.monotonic() + 20
    while len(letters) < 2 and time.monotonic() < deadline:
        msg = reader.poll(0.5)
        if msg is not None and msg.error() is None:
            letters.append(msg)
    reader.close()
    by_offset = {parse_headers(m.headers())[HEADER_OFFSET]: m for m in letters}
    big, deep = by_offset["1"], by_offset["3"]
    big_headers = parse_headers(big.headers())
    assert big_headers[HEADER_ORIGINAL_SIZE] == "1000000"
    assert len(big.value()) == TRUNCATED_BYTES and BIG.startswith(big.value())
    assert "MAX_RECORD_BYTES" in big_headers[HEADER_ERROR]
    assert deep.value() == DEEP
    assert "nested too deeply" in parse_headers(deep.headers())[HEADER_ERROR]
