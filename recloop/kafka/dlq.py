"""The one consumer every confluent-kafka process uses: decode, dead-letter, commit.

``DeadLetterConsumer`` subscribes to topics of the table in ``recloop.core.topics`` and decodes each
message with ``recloop.core.codec`` as that topic's value type. A message that does not decode is
produced unchanged (same key, same value bytes) to ``<topic>.dlq`` with the headers of
``recloop.core.dlq.dlq_headers`` and is not returned; the valid messages around it are returned in
order. ``commit()`` first flushes the dead-letter producer and checks every dead letter
arrived, then commits past everything returned or dead-lettered, so a crash can repeat
work (at-least-once; transitions carry deterministic ids) but never lose a record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from recloop import metrics
from recloop.core import codec, topics
from recloop.core.dlq import dlq_headers
from recloop.core.events import Record
from recloop.core.settings import Settings
from recloop.kafka.clients import DeliveryTracker, flush_or_raise, make_consumer, make_producer


@dataclass(frozen=True)
class Consumed:
    """One decoded message and where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Record
    timestamp_ms: int


@dataclass
class PollStats:
    """Counts since the consumer was made: returned, dead-lettered, and transient errors seen."""

    returned: int = 0
    dead_lettered: int = 0
    errors: int = 0
    last_error: str | None = None


class DeadLetterConsumer:
    """A manual-commit consumer over ``base_topics`` (names from ``recloop.core.topics``).

    ``name`` identifies this consumer in dead-letter headers. ``value_types`` may override the
    table's value type for a resolved topic name (tools reading foreign topics).
    """

    def __init__(
        self,
        settings: Settings,
        base_topics: Sequence[str],
        group_id: str,
        name: str,
        *,
        value_types: Mapping[str, Any] | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        producer: Producer | None = None,
        on_assign: Callable[[Consumer, list[TopicPartition]], None] | None = None,
    ) -> None:
        resolved = settings.topics
        self.value_types: dict[str, Any] = {
            resolved.name(base): topics.spec(base).value for base in base_topics
        }
        self.value_types.update(value_types or {})
        self.name = name
        self._process = name.split(":", 1)[0]
        self._topics = resolved
        self._consumer: Consumer = make_consumer(settings, group_id, consumer_config)
        self._producer = producer or make_producer(settings)
        self._deliveries = DeliveryTracker()
        self._dlq_pending = False
        # Next offset to commit per partition: one past the last message we handled.
        self._positions: dict[tuple[str, int], int] = {}
        self.stats = PollStats()
        # ``on_assign`` lets a caller start partitions elsewhere than the committed offsets
        # (the learner resumes from its snapshot's offsets); it must call consumer.assign.
        subscribe_args: dict[str, Any] = {"on_revoke": self._on_revoke}
        if on_assign is not None:
            subscribe_args["on_assign"] = on_assign
        self._consumer.subscribe(list(self.value_types), **subscribe_args)

    # -- reading -----------------------------------------------------------------------------

    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> list[Consumed]:
        """Up to ``max_records`` decoded messages, waiting at most ``timeout`` seconds.

        Undecodable messages are dead-lettered and left out. Transient Kafka errors are
        counted in ``stats``; a fatal one raises ``KafkaException``.
        """
        messages = self._consumer.consume(num_messages=max_records, timeout=timeout)
        out: list[Consumed] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                # librdkafka recovers from non-fatal errors by itself; a fatal one leaves the
                # consumer unusable, and raising loses nothing because nothing was committed.
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    self.stats.last_error = err.str()
                    self.stats.errors += 1
                continue
            topic, partition, offset = _where(msg)
            try:
                record = codec.decode(msg.value(), self.value_types[topic])
            except codec.RecordDecodeError as exc:
                self._dead_letter(msg, topic, partition, offset, str(exc))
                metrics.DECODE_ERRORS.labels(self._process, topic).inc()
                metrics.DLQ.labels(self._process, topic).inc()
            else:
                metrics.RECORDS_IN.labels(self._process, topic).inc()
                _, ts = msg.timestamp()
                out.append(Consumed(topic, partition, offset, msg.key(), record, ts))
                self.stats.returned += 1
            self._positions[(topic, partition)] = offset + 1
        return out

    def _dead_letter(
        self, msg: Message, topic: str, partition: int, offset: int, error: str
    ) -> None:
        headers: list[tuple[str, str | bytes | None]] = list(
            dlq_headers(error, topic, partition, offset, self.name)
        )
        while True:
            try:
                self._producer.produce(
                    self._topics.dlq(topic),
                    key=msg.key(),
                    value=msg.value(),
                    headers=headers,
                    on_delivery=self._deliveries,
                )
                break
            except BufferError:
                self._producer.poll(0.1)
        self._dlq_pending = True
        self.stats.dead_lettered += 1

    # -- committing --------------------------------------------------------------------------

    def commit(self, flush_timeout: float = 30.0) -> dict[tuple[str, int], int]:
        """Commit past everything returned or dead-lettered; returns the committed positions.

        Dead letters are flushed and confirmed first: committing past a record whose dead
        letter was lost would lose it.
        """
        if self._dlq_pending:
            flush_or_raise(self._producer, self._deliveries, flush_timeout)
            self._dlq_pending = False
        if not self._positions:
            return {}
        positions, self._positions = self._positions, {}
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        self._consumer.commit(offsets=offsets, asynchronous=False)
        return positions

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member will own these partitions. What we returned but did not commit will
        # be delivered again there: at-least-once, never lost.
        for tp in partitions:
            self._positions.pop((tp.topic, tp.partition), None)

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def consumer(self) -> Consumer:
        """The wrapped consumer, for assignment queries, lag and seeks."""
        return self._consumer

    def close(self) -> None:
        """Flush dead letters and close the consumer (uncommitted positions are not committed)."""
        try:
            if self._dlq_pending:
                flush_or_raise(self._producer, self._deliveries)
        finally:
            self._consumer.close()

    def __enter__(self) -> DeadLetterConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _where(msg: Message) -> tuple[str, int, int]:
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    # Only error events lack a position, and poll_batch has set those aside already.
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset
