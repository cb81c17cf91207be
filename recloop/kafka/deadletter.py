"""Decoding and dead-lettering, written once over the ``Bus`` (Kafka and in-memory alike).

``Reader`` subscribes to topics of the table in ``recloop.core.topics`` and decodes each
record with ``recloop.core.codec`` as that topic's value type. A record that does not decode
goes, unchanged (same key, same value bytes), to ``<topic>.dlq`` with the headers of
``recloop.core.dlq.dlq_headers`` and is not returned; the valid records around it are
returned in order. A service that decodes a record but cannot use it calls
``Reader.dead_letter`` (one public ``dead_letter`` underneath), which sends its original
bytes too.

The commit rule, the reason this lives in one place: a dead letter is *pending* from the
moment it is published until the bus acknowledges it, and ``commit()`` first flushes and
confirms every pending dead letter, then commits past everything returned or dead-lettered.
A crash can repeat work (at-least-once; transitions carry deterministic ids) but never lose
or skip a record.

This module imports no Kafka client: the in-process loop uses it with ``MemoryBus``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recloop import metrics
from recloop.core import codec, topics
from recloop.core.dlq import dlq_headers
from recloop.core.events import Record
from recloop.core.ports import Bus, BusConsumer, Positions


@dataclass(frozen=True)
class Consumed:
    """One decoded message and where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Record
    timestamp_ms: int
    raw: bytes = b""
    """The value bytes as read (what a dead letter carries)."""


@dataclass
class PollStats:
    """Counts since the reader was made: returned, dead-lettered, and transient errors seen."""

    returned: int = 0
    dead_lettered: int = 0
    errors: int = 0
    last_error: str | None = None


def dead_letter(
    bus: Bus,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes,
    error: str,
    consumer: str,
) -> None:
    """Publish ``value`` unchanged to ``<topic>.dlq`` with the dead-letter headers.

    Only publishes: whoever commits past the source offset must flush first (``Reader``
    does).
    """
    headers = dlq_headers(error, topic, partition, offset, consumer)
    bus.publish(f"{topic}{topics.DLQ_SUFFIX}", key, value, headers)


class Reader:
    """A manual-commit reader of ``base_topics`` (names from ``recloop.core.topics``).

    ``name`` identifies this consumer in dead-letter headers (its part before ``:`` labels
    the metrics). ``value_types`` may override the table's value type for a resolved topic
    name. ``resolved`` resolves base names (a deployment prefix).
    """

    def __init__(
        self,
        bus: Bus,
        resolved: topics.Topics,
        base_topics: Sequence[str],
        group_id: str,
        name: str,
        *,
        value_types: Mapping[str, Any] | None = None,
        from_end: bool = False,
        start_at: Callable[[str, int], int | None] | None = None,
        tuning: Mapping[str, Any] | None = None,
    ) -> None:
        self.value_types: dict[str, Any] = {
            resolved.name(base): topics.spec(base).value for base in base_topics
        }
        self.value_types.update(value_types or {})
        self.name = name
        self.bus = bus
        self._process = name.split(":", 1)[0]
        self.consumer: BusConsumer = bus.subscribe(
            list(self.value_types), group_id, from_end=from_end, start_at=start_at,
            tuning=tuning,
        )  # fmt: skip
        self._dlq_pending = False
        self._positions: Positions = {}
        self.stats = PollStats()

    @property
    def dlq_pending(self) -> bool:
        """Whether a dead letter was published and not yet confirmed by a flush."""
        return self._dlq_pending

    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> list[Consumed]:
        """Up to ``max_records`` decoded messages, waiting at most ``timeout`` seconds."""
        out: list[Consumed] = []
        for msg in self.consumer.poll(max_records, timeout):
            try:
                record = codec.decode(msg.value, self.value_types[msg.topic])
            except codec.RecordDecodeError as exc:
                self._dead_letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value,
                                  str(exc))  # fmt: skip
                metrics.DECODE_ERRORS.labels(self._process, msg.topic).inc()
            else:
                metrics.RECORDS_IN.labels(self._process, msg.topic).inc()
                out.append(Consumed(msg.topic, msg.partition, msg.offset, msg.key, record,
                                    msg.timestamp_ms, msg.value))  # fmt: skip
                self.stats.returned += 1
            self._positions[(msg.topic, msg.partition)] = msg.offset + 1
        return out

    def dead_letter(self, item: Consumed, error: str) -> None:
        """Dead-letter a record that decoded but cannot be used, with its original bytes
        (a reader may decode only part of a record, so re-encoding could drop fields).
        Pending until the next ``commit``."""
        value = item.raw or codec.encode(item.value)
        self._dead_letter(item.topic, item.partition, item.offset, item.key, value, error)

    def _dead_letter(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
        error: str,
    ) -> None:  # fmt: skip
        dead_letter(self.bus, topic, partition, offset, key, value, error, self.name)
        self._dlq_pending = True
        self.stats.dead_lettered += 1
        metrics.DLQ.labels(self._process, topic).inc()

    def forget(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Drop uncommitted positions of partitions this member lost (a rebalance)."""
        for tp in partitions:
            self._positions.pop(tp, None)

    def commit(self, flush_timeout: float | None = None) -> Positions:
        """Commit past everything returned or dead-lettered; returns the committed positions.

        Dead letters are flushed and confirmed first: committing past a record whose dead
        letter was lost would lose it. A commit that fails (the broker is away, a rebalance)
        keeps its positions for the next one, so a partition read once is still committed.
        """
        if self._dlq_pending:
            self.bus.flush(flush_timeout)
            self._dlq_pending = False
        if not self._positions:
            return {}
        positions, self._positions = self._positions, {}
        try:
            self.consumer.commit(positions)
        except Exception:
            # Newer positions read meanwhile win; the rest are tried again next time.
            self._positions = {**positions, **self._positions}
            raise
        return positions

    def close(self) -> None:
        """Flush dead letters and close the consumer (uncommitted positions are not committed)."""
        try:
            if self._dlq_pending:
                self.bus.flush()
        finally:
            self.consumer.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fatal(exc: Exception) -> bool:
    """Whether a bus error leaves its client unusable: a fatal Kafka error, or anything that
    is not a Kafka error at all (so bugs are not swallowed as broker trouble)."""
    error = exc.args[0] if exc.args else None
    is_kafka = type(exc).__name__ == "KafkaException" and hasattr(error, "fatal")
    return not is_kafka or bool(error.fatal())  # type: ignore[union-attr]
