"""Small factories for confluent-kafka clients built from ``recloop.core.settings.Settings``.

Every process makes its clients here, so security options and sane defaults (acks=all,
idempotent producer, manual commits, fast group recovery, patience with an absent broker)
are set in one place.

A broker outage is waited out, not died of: librdkafka keeps retrying each queued record
for ``DELIVERY_TIMEOUT_S``, and ``wait_for_deliveries`` waits that long for the queue to
drain, saying "waiting for the broker" in the log and in ``recloop_waiting_for_broker``
meanwhile. Only a record librdkafka gave up on (an outage longer than that) raises
``DeliveryError``. The simulator and serving then exit without committing, and a restart
resumes from the last committed offsets; the learner keeps its unacknowledged announcement
and sends it again (``services.learn``). Either way nothing is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

from recloop import metrics
from recloop.core import codec
from recloop.core.events import Record
from recloop.core.settings import Settings

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT_S = 600.0
"""How long librdkafka retries a record before giving up on it (``message.timeout.ms``):
an outage shorter than this loses nothing and kills nothing."""
WAIT_REPORT_AFTER_S = 5.0
"""A flush that waits longer than this is reported as waiting for the broker."""


def make_producer(settings: Settings, extra: Mapping[str, Any] | None = None) -> Producer:
    """A producer that waits for the leader, never duplicates on retry and rides out an
    outage of up to ``DELIVERY_TIMEOUT_S``."""
    conf = {
        **settings.kafka_client_config(),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000),
        **(extra or {}),
    }
    return Producer(conf)


CONSUMER_SESSION: dict[str, Any] = {
    # The broker's group.min.session.timeout.ms is 6 s by default; 10 s leaves room for a
    # busy machine's pauses without a spurious rebalance.
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 1_000,
}
"""Group membership timing of every recloop consumer: a dead member is replaced in ~10 s."""


def make_consumer(
    settings: Settings, group_id: str, extra: Mapping[str, Any] | None = None
) -> Consumer:
    """A consumer with manual commits: offsets move only when the caller says so.

    A member that dies (kill -9) holds its partitions until its session times out, and
    nothing is read from them meanwhile: librdkafka's default of 45 s made every crash a
    45 s stall. ``CONSUMER_SESSION`` makes it seconds, as the streams worker's faust
    consumer has.
    """
    conf = {
        **settings.kafka_client_config(),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        **CONSUMER_SESSION,
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
    """Flush ``producer`` and raise if anything is still queued after ``timeout`` or failed
    (tools and benchmarks; the services wait with ``wait_for_deliveries``)."""
    remaining = producer.flush(timeout)
    if remaining:
        raise DeliveryError(f"{remaining} message(s) still queued after {timeout:.0f} s")
    tracker.raise_if_failed()


def wait_for_deliveries(
    producer: Producer,
    tracker: DeliveryTracker,
    process: str,
    timeout: float | None = None,
    report_every_s: float = 10.0,
) -> None:
    """Wait until every queued record is delivered or given up on; raise if one failed.

    With no ``timeout`` the wait is bounded by librdkafka itself (``DELIVERY_TIMEOUT_S`` per
    record), so a broker outage is waited out. A wait longer than ``WAIT_REPORT_AFTER_S`` is
    logged every ``report_every_s`` and raises ``recloop_waiting_for_broker{process}`` until
    the queue drains. With a ``timeout``, records still queued after it raise
    ``DeliveryError`` (they stay queued and may still be delivered).
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    reported_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            left = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
            remaining = producer.flush(left)
            if remaining == 0:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise DeliveryError(f"{remaining} message(s) still queued after {timeout:.0f} s")
            waited = now - start
            if waited >= WAIT_REPORT_AFTER_S and (
                reported_at is None or now - reported_at >= report_every_s
            ):
                if reported_at is None:
                    metrics.WAITING_FOR_BROKER.labels(process).set(1)
                log.warning("%s: waiting for the broker: %d message(s) queued for %.0f s",
                            process, remaining, waited)  # fmt: skip
                reported_at = now
    finally:
        if reported_at is not None:
            metrics.WAITING_FOR_BROKER.labels(process).set(0)
            log.warning("%s: the broker is back after %.0f s", process, time.monotonic() - start)
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
