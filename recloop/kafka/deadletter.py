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

Hostile records cannot stop a reader or make it skip one:

- a value over ``MAX_RECORD_BYTES`` is not decoded; it is dead-lettered truncated
  (``recloop.core.dlq.truncated``, its size in ``HEADER_ORIGINAL_SIZE``);
- a dead letter the bus refuses at once (librdkafka's ``MSG_SIZE_TOO_LARGE``, any error
  of ``publish``) is sent truncated instead; if that is refused too, the record and every
  one read after it are *held*, nothing past them is marked for commit, and the next
  ``poll_batch`` starts with them (``PollStats.errors`` counts each try);
- a position moves only past a record that was returned or whose dead letter was
  published, so a record read but not handled is never committed past;
- a flush in ``commit`` that fails (a dead letter the broker did not acknowledge) keeps the
  reader from committing at all, now and later (``DeadLetterLost``): the process exits and
  reads again from its last commit, so the dead letter is sent again, not lost.

This module imports no Kafka client: the in-process loop uses it with ``MemoryBus``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recloop import metrics
from recloop.core import codec, topics
from recloop.core.dlq import MAX_RECORD_BYTES, dlq_headers, truncated
from recloop.core.events import Record
from recloop.core.ports import Bus, BusConsumer, BusMessage, Positions


class DeadLetterLost(RuntimeError):
    """A dead letter was not acknowledged by the bus: this reader must not commit again
    (committing would skip its record); restart it to read from the last commit."""


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
    original_size: int | None = None,
) -> None:
    """Publish ``value`` to ``<topic>.dlq`` with the dead-letter headers: unchanged, or (with
    ``original_size``) as the truncated part of a record of that size.

    Only publishes: whoever commits past the source offset must flush first (``Reader``
    does).
    """
    headers = dlq_headers(error, topic, partition, offset, consumer, original_size)
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
        self._dlq_lost: str | None = None
        self._held: list[BusMessage] = []
        self._positions: Positions = {}
        self.stats = PollStats()

    @property
    def dlq_pending(self) -> bool:
        """Whether a dead letter was published and not yet confirmed by a flush."""
        return self._dlq_pending

    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> list[Consumed]:
        """Up to ``max_records`` decoded messages, waiting at most ``timeout`` seconds.

        Records held after a refused dead letter come first (see the module docstring)."""
        if self._held:
            messages, self._held = self._held, []
        else:
            messages = self.consumer.poll(max_records, timeout)
        out: list[Consumed] = []
        for i, msg in enumerate(messages):
            if not self._handle(msg, out):
                self._held = messages[i:]
                break
            self._positions[(msg.topic, msg.partition)] = msg.offset + 1
        return out

    def _handle(self, msg: BusMessage, out: list[Consumed]) -> bool:
        """Return ``msg`` decoded (into ``out``) or dead-letter it (truncated if it is over
        ``MAX_RECORD_BYTES``, which the codec refuses unparsed); False if neither could be
        done (its dead letter was refused even truncated)."""
        try:
            record = codec.decode(msg.value, self.value_types[msg.topic])
        except codec.RecordDecodeError as exc:
            whole = len(msg.value) <= MAX_RECORD_BYTES
            if not self._try_dead_letter(msg.topic, msg.partition, msg.offset, msg.key,
                                         msg.value, str(exc), whole=whole):  # fmt: skip
                return False
            metrics.DECODE_ERRORS.labels(self._process, msg.topic).inc()
            return True
        metrics.RECORDS_IN.labels(self._process, msg.topic).inc()
        out.append(Consumed(msg.topic, msg.partition, msg.offset, msg.key, record,
                            msg.timestamp_ms, msg.value))  # fmt: skip
        self.stats.returned += 1
        return True

    def dead_letter(self, item: Consumed, error: str) -> None:
        """Dead-letter a record that decoded but cannot be used, with its original bytes
        (a reader may decode only part of a record, so re-encoding could drop fields).
        Pending until the next ``commit``; raises if the bus refuses it even truncated (the
        caller must not go on past the record then)."""
        value = item.raw or codec.encode(item.value)
        if not self._try_dead_letter(item.topic, item.partition, item.offset, item.key, value,
                                     error):  # fmt: skip
            raise DeadLetterLost(
                f"{item.topic}[{item.partition}]@{item.offset}: the bus refused its dead "
                f"letter ({self.stats.last_error})"
            )

    def _try_dead_letter(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
        error: str, *, whole: bool = True,
    ) -> bool:  # fmt: skip
        """Publish the dead letter whole (if ``whole``), else or on refusal truncated;
        False if the bus refused both."""
        if whole:
            try:
                dead_letter(self.bus, topic, partition, offset, key, value, error, self.name)
            except Exception as exc:  # noqa: BLE001 - any refusal: try the truncated letter
                self._note_error(f"dead letter of {topic}[{partition}]@{offset} refused: {exc}")
                error = f"{error}; the whole record was refused as a dead letter ({exc})"
            else:
                self._dead_lettered(topic)
                return True
        try:
            dead_letter(self.bus, topic, partition, offset, key, truncated(value), error,
                        self.name, original_size=len(value))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - held, tried again at the next poll
            self._note_error(f"truncated dead letter of {topic}[{partition}]@{offset} "
                             f"refused: {exc}")  # fmt: skip
            return False
        self._dead_lettered(topic)
        return True

    def _dead_lettered(self, topic: str) -> None:
        self._dlq_pending = True
        self.stats.dead_lettered += 1
        metrics.DLQ.labels(self._process, topic).inc()

    def _note_error(self, message: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = message[:1000]

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
        if self._dlq_lost is not None:
            raise DeadLetterLost(self._dlq_lost)
        if self._dlq_pending:
            try:
                self.bus.flush(flush_timeout)
            except Exception as exc:
                # The lost dead letter's record lies behind the positions: never commit them.
                self._dlq_lost = f"a dead letter was not acknowledged ({exc}); restart to read again"
                self._positions = {}
                raise DeadLetterLost(self._dlq_lost) from exc
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
