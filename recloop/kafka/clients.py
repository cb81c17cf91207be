"""Small factories for confluent-kafka clients built from ``recloop.core.settings.Settings``.

Every process makes its clients here, so security options and sane defaults (acks=all,
idempotent producer, manual commits) are set in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

from recloop.core import codec
from recloop.core.events import Record
from recloop.core.settings import Settings


def make_producer(settings: Settings, extra: Mapping[str, Any] | None = None) -> Producer:
    """A producer that waits for the leader and never duplicates on retry."""
    conf = {
        **settings.kafka_client_config(),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        **(extra or {}),
    }
    return Producer(conf)


def make_consumer(
    settings: Settings, group_id: str, extra: Mapping[str, Any] | None = None
) -> Consumer:
    """A consumer with manual commits: offsets move only when the caller says so."""
    conf = {
        **settings.kafka_client_config(),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        **(extra or {}),
    }
    return Consumer(conf)


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka_client_config())


class DeliveryError(RuntimeError):
    """At least one produced message was not acknowledged by the broker."""


class DeliveryTracker:
    """A delivery callback that remembers failures, so a flush can be checked, not hoped for."""

    def __init__(self) -> None:
        self.delivered = 0
        self.errors: list[str] = []

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    def raise_if_failed(self) -> None:
        if self.errors:
            errors, self.errors = self.errors, []
            raise DeliveryError(f"{len(errors)} message(s) not delivered, first: {errors[0]}")


def flush_or_raise(producer: Producer, tracker: DeliveryTracker, timeout: float = 30.0) -> None:
    """Flush ``producer`` and raise if anything is still queued or failed."""
    remaining = producer.flush(timeout)
    if remaining:
        raise DeliveryError(f"{remaining} message(s) still queued after {timeout:.0f} s")
    tracker.raise_if_failed()


def _as_bytes(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def produce_records(
    producer: Producer,
    topic: str,
    records: Iterable[Record],
    key_fn: Callable[[Any], str | bytes | None],
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> int:
    """Encode each record with ``recloop.core.codec`` and produce it keyed by ``key_fn(record)``.

    Does not flush: the caller decides when to wait. Returns how many were queued.
    """
    n = 0
    for record in records:
        produce_retrying(producer, topic, _as_bytes(key_fn(record)), codec.encode(record),
                         on_delivery=on_delivery)  # fmt: skip
        n += 1
        producer.poll(0)
    return n


def produce_retrying(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes,
    headers: Sequence[tuple[str, bytes]] = (),
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> None:
    """``producer.produce`` that waits for room: the one produce-retry loop of recloop.

    librdkafka raises ``BufferError`` when its local queue is full; serving delivery
    reports (``poll``) makes room, so the record is retried until it is queued.
    """
    kwargs: dict[str, Any] = {"value": value, "key": key, "on_delivery": on_delivery}
    if headers:
        kwargs["headers"] = list(headers)
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)
