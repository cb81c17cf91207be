"""The Kafka ``Bus``: confluent-kafka clients behind the port of ``recloop.core.ports``.

- ``publish`` without headers queues into an ``Outbox`` (one ``produce_batch`` per topic
  at the next ``serve``/``flush``); with headers (dead letters) it produces at once, through
  the one produce-retry loop ``clients.produce_retrying``;
- ``flush`` sends the outbox, waits for every delivery report and raises ``DeliveryError``
  if anything was not acknowledged; without a timeout it waits out a broker outage
  (``clients.wait_for_deliveries``), saying so in the log and in a metric;
- ``subscribe`` makes a manual-commit consumer; ``from_end`` first commits the group at the
  high watermark of every partition (``commit_group_at_end``), ``start_at`` seeks each
  assigned partition where the caller says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from recloop.core.ports import BusMessage, Positions
from recloop.core.settings import Settings
from recloop.kafka.clients import (
    DeliveryTracker,
    make_consumer,
    make_producer,
    produce_retrying,
    wait_for_deliveries,
)
from recloop.kafka.outbox import Outbox


class KafkaBus:
    """One producer (and its outbox) shared by every consumer made from this bus."""

    def __init__(
        self,
        settings: Settings,
        producer_tuning: Mapping[str, Any] | None = None,
        producer: Producer | None = None,
        process: str = "recloop",
    ) -> None:
        self.settings = settings
        self.process = process
        self.producer = producer or make_producer(settings, producer_tuning)
        self.deliveries = DeliveryTracker()
        self.outbox = Outbox(self.producer, self.deliveries, process)

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        if headers:
            produce_retrying(self.producer, topic, key, value, headers, self.deliveries)
        else:
            self.outbox.add(topic, key, value)

    def serve(self) -> None:
        self.outbox.send()
        self.producer.poll(0)
        self.deliveries.raise_if_failed()

    def flush(self, timeout: float | None = None) -> None:
        self.outbox.send()
        wait_for_deliveries(self.producer, self.deliveries, self.process, timeout)

    def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        from_end: bool = False,
        start_at: Callable[[str, int], int | None] | None = None,
        tuning: Mapping[str, Any] | None = None,
    ) -> KafkaConsumer:
        if from_end:
            for topic in topics:
                commit_group_at_end(self.settings, topic, group)
        return KafkaConsumer(make_consumer(self.settings, group, tuning), topics, start_at)


class KafkaConsumer:
    """A subscribed confluent-kafka consumer as a ``BusConsumer``."""

    def __init__(
        self,
        consumer: Consumer,
        topics: Sequence[str],
        start_at: Callable[[str, int], int | None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.errors = 0
        self.last_error: str | None = None
        self._start_at = start_at
        args: dict[str, Any] = {}
        if start_at is not None:
            args["on_assign"] = self._on_assign
        consumer.subscribe(list(topics), **args)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._start_at is not None
        for tp in partitions:
            offset = self._start_at(tp.topic, tp.partition)
            if offset is not None:
                tp.offset = int(offset)
        consumer.assign(partitions)

    def poll(self, max_records: int, timeout: float) -> list[BusMessage]:
        """Records, leaving out error events: transient ones are counted, fatal ones raise
        (nothing was committed, so raising loses nothing)."""
        out: list[BusMessage] = []
        for msg in self.consumer.consume(num_messages=max_records, timeout=timeout):
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    self.last_error = err.str()
                    self.errors += 1
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            raw = msg.headers() or []
            pairs = raw.items() if isinstance(raw, dict) else raw
            headers = tuple((k, _as_bytes(v)) for k, v in pairs)
            out.append(BusMessage(topic, partition, offset, msg.key(), msg.value() or b"",
                                  headers, msg.timestamp()[1]))  # fmt: skip
        return out

    def commit(self, positions: Positions) -> None:
        # Only partitions still ours: another member owns the rest now, and what we read of
        # them will be delivered again there (at-least-once, never lost).
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items() if (t, p) in owned]
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=False)

    def assigned(self) -> bool:
        return bool(self.consumer.assignment())

    def caught_up(self) -> bool:
        """Every assigned partition read to the high watermark the broker reports now."""
        assignment = self.consumer.assignment()
        if not assignment:
            return False
        try:
            positions = self.consumer.position(assignment)
            marks = [self.consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
                     for tp in positions]  # fmt: skip
        except KafkaException as exc:  # a leader moving, a slow broker: not yet, then
            self.last_error = str(exc)
            self.errors += 1
            return False
        for tp, (low, high) in zip(positions, marks, strict=True):
            # No position yet (nothing fetched) is behind unless the partition is empty.
            if (tp.offset < 0 and high > low) or (tp.offset >= 0 and tp.offset < high):
                return False
        return True

    def close(self) -> None:
        self.consumer.close()


def commit_group_at_end(
    settings: Settings, topic: str, group_id: str, timeout_s: float = 30.0
) -> None:
    """Commit ``group_id``'s offsets at the high watermark of every partition of ``topic``.

    Unlike auto.offset.reset=latest, which resolves "latest" only when fetching starts (after
    a rebalance that may outlast the first answers), this pins the start before anything is
    requested.
    """
    consumer = make_consumer(settings, group_id)
    try:
        deadline = time.monotonic() + timeout_s
        while (
            meta := consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        ).error is not None:
            # A topic created a moment ago may not be known to the broker's metadata yet.
            if meta.error.code() not in _NOT_READY or time.monotonic() > deadline:
                raise KafkaException(meta.error)
            time.sleep(0.2)
        offsets = [
            TopicPartition(topic, p, _high_watermark(consumer, topic, p, deadline))
            for p in sorted(meta.partitions)
        ]
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


_NOT_READY = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
}


def _high_watermark(consumer: Consumer, topic: str, partition: int, deadline: float) -> int:
    # Likewise its partitions may not have a leader yet.
    while True:
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5.0)[1]
        except KafkaException as exc:
            if exc.args[0].code() not in _NOT_READY or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _as_bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else (value or b"")
