"""The dead-letter convention shared by every consumer (confluent-kafka and faust alike).

A record that cannot be decoded goes, unchanged, to ``<topic>.dlq`` with the original key
and these headers, so an operator can see why and replay it once fixed.

A record too large to decode (over ``MAX_RECORD_BYTES``), or one whose whole dead letter the
broker refuses, goes as its first ``TRUNCATED_BYTES`` bytes instead, with its original size
in ``HEADER_ORIGINAL_SIZE`` (``truncated``): a dead letter can always be written.
"""

from __future__ import annotations

HEADER_ERROR = "recloop.dlq.error"
HEADER_TOPIC = "recloop.dlq.source_topic"
HEADER_PARTITION = "recloop.dlq.source_partition"
HEADER_OFFSET = "recloop.dlq.source_offset"
HEADER_CONSUMER = "recloop.dlq.consumer"
HEADER_ORIGINAL_SIZE = "recloop.dlq.original_size"
"""Present only on a truncated dead letter: the source value's size in bytes."""

MAX_RECORD_BYTES = 900_000
"""The largest record value any recloop consumer decodes; a larger one is dead-lettered
truncated, undecoded. It lies below librdkafka's default ``message.max.bytes`` (1,000,000)
so that an untruncated dead letter of an accepted record, headers included, still fits."""
BROKER_MESSAGE_MAX_BYTES = 1_048_588
"""The broker's ``message.max.bytes`` (Kafka's default, set explicitly on recloop's local
broker and in compose): the largest record batch a topic takes. Every recloop client may
send and fetch this much, so a record the broker took is always fetched, and the dead letter
of any record a consumer decodes (at most ``MAX_RECORD_BYTES``, headers included) fits."""
TRUNCATED_BYTES = 65_536
"""How much of a record a truncated dead letter keeps."""


def dlq_headers(
    error: str,
    topic: str,
    partition: int,
    offset: int,
    consumer: str,
    original_size: int | None = None,
) -> list[tuple[str, bytes]]:
    """Headers for a dead-lettered record; values are UTF-8 bytes as Kafka stores them.
    ``original_size`` marks a truncated dead letter."""
    headers = [
        (HEADER_ERROR, error.encode("utf-8", "replace")[:4000]),
        (HEADER_TOPIC, topic.encode("utf-8", "replace")[:1000]),
        (HEADER_PARTITION, str(partition).encode()),
        (HEADER_OFFSET, str(offset).encode()),
        (HEADER_CONSUMER, consumer.encode("utf-8", "replace")[:1000]),
    ]
    if original_size is not None:
        headers.append((HEADER_ORIGINAL_SIZE, str(original_size).encode()))
    return headers


def truncated(value: bytes, keep: int = TRUNCATED_BYTES) -> bytes:
    """The part of ``value`` a truncated dead letter carries (its size goes in a header)."""
    return bytes(value[:keep])


def parse_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Read DLQ headers back into a dict of strings (for tools and tests)."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (headers or [])}
