"""Read a topic from beginning to its current end, without joining a consumer group.

For tools, benchmarks and tests that inspect what the loop wrote (the services themselves
consume through ``DeadLetterConsumer``).
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, TopicPartition

from core import codec
from core.settings import Settings


def read_topic(
    settings: Settings, topic: str, value_type: Any, timeout_s: float = 60.0
) -> list[tuple[int, int, Any]]:
    """Every record now on ``topic`` as ``(partition, offset, decoded value)``."""
    consumer = Consumer({
        **settings.kafka_client_config(), "group.id": "recloop-reader",
        "enable.auto.commit": False,
    })  # fmt: skip
    out: list[tuple[int, int, Any]] = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for p in sorted(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            consumer.assign([TopicPartition(topic, p, low)])
            position = low
            while position < high:
                batch = consumer.consume(1000, timeout=timeout_s)
                if not batch:
                    raise TimeoutError(f"{topic}[{p}] stalled at offset {position} of {high}")
                for msg in batch:
                    if msg.error():
                        continue
                    out.append((p, msg.offset(), codec.decode(msg.value(), value_type)))
                    position = msg.offset() + 1
    finally:
        consumer.close()
    return out


def end_offsets(settings: Settings, topic: str) -> int:
    """Sum of the log-end offsets of ``topic``'s partitions."""
    consumer = Consumer({**settings.kafka_client_config(), "group.id": "recloop-reader"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()
