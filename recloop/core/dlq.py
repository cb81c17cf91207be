"""The dead-letter convention shared by every consumer (confluent-kafka and faust alike).

A record that cannot be decoded goes, unchanged, to ``<topic>.dlq`` with the original key
and these headers, so an operator can see why and replay it once fixed.
"""

from __future__ import annotations

HEADER_ERROR = "recloop.dlq.error"
HEADER_TOPIC = "recloop.dlq.source_topic"
HEADER_PARTITION = "recloop.dlq.source_partition"
HEADER_OFFSET = "recloop.dlq.source_offset"
HEADER_CONSUMER = "recloop.dlq.consumer"


def dlq_headers(
    error: str, topic: str, partition: int, offset: int, consumer: str
) -> list[tuple[str, bytes]]:
    """Headers for a dead-lettered record; values are UTF-8 bytes as Kafka stores them."""
    return [
        (HEADER_ERROR, error.encode("utf-8", "replace")[:4000]),
        (HEADER_TOPIC, topic.encode()),
        (HEADER_PARTITION, str(partition).encode()),
        (HEADER_OFFSET, str(offset).encode()),
        (HEADER_CONSUMER, consumer.encode()),
    ]


def parse_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Read DLQ headers back into a dict of strings (for tools and tests)."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (headers or [])}
