"""Read a topic from beginning to its current end, without joining a consumer group.

For tools, benchmarks and tests that inspect what the loop wrote (the services themselves
consume through ``DeadLetterConsumer``).
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from recloop.core import codec
from recloop.core.settings import Settings


def read_topic(
    settings: Settings, topic: str, value_type: Any, timeout_s: float = 120.0
) -> list[tuple[int, int, Any]]:
    """Every record now on ``topic`` as ``(partition, offset, decoded value)``."""
    return [(p, offset, codec.decode(msg.value(), value_type))
            for p, offset, msg in read_messages(settings, topic, timeout_s)]  # fmt: skip


def read_messages(
    settings: Settings, topic: str, timeout_s: float = 120.0
) -> list[tuple[int, int, Message]]:
    """Every message now on ``topic`` as ``(partition, offset, message)``, undecoded.

    Reads each partition up to the log end seen at the start. Compacted topics may have
    gaps and transactional ones control records, so a partition is done when the reader's
    position passes that end, not when a record with offset end-1 arrives.
    """
    consumer = Consumer({
        **settings.kafka_client_config(), "group.id": settings.topics.group("recloop-reader"),
        "enable.auto.commit": False,
    })  # fmt: skip
    out: list[tuple[int, int, Message]] = []
    deadline = time.monotonic() + timeout_s
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for p in sorted(partitions):
            tp = TopicPartition(topic, p)
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            while consumer.position([tp])[0].offset < high:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic}[{p}] up to offset {high} timed out")
                for msg in consumer.consume(1000, timeout=1.0):
                    offset = msg.offset()
                    if msg.error() is None and msg.partition() == p and offset is not None \
                            and offset < high:
                        out.append((p, offset, msg))
            consumer.unassign()
    finally:
        consumer.close()
    return out


def end_offsets(settings: Settings, topic: str) -> int:
    """Sum of the log-end offsets of ``topic``'s partitions."""
    consumer = Consumer({**settings.kafka_client_config(), "group.id": settings.topics.group("recloop-reader")})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()
