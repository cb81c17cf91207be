"""Fold a batch of raw Kafka records into per-user states, transitions and rejects.

This is everything the faust agent does between receiving a batch and sending its results,
kept free of faust so the raw aiokafka baseline of ``recloop bench streams`` runs the very
same code. Per batch, each user's state is decoded once, folded through all of the user's
records, and encoded once: that is what keeps the per-event work small.

Records the fold cannot use come back as rejects for the dead-letter topic: bytes that do
not decode, a key that is not the record's user (co-partitioning depends on it), feedback
that contradicts its slate, and a record the fold's buffers have no room for. So does
feedback the fold had buffered and can never use (``fold.take_rejected``: its slate came and
contradicted it, or its session ended without it), taken from each touched user's state at
the end of the batch; it may have come batches earlier, so its reject is re-encoded and
carries offset -1.

Nothing a record holds can stop the worker (issue 12): a record over
``recloop.core.dlq.MAX_RECORD_BYTES`` (key and value together) is rejected without being
decoded; any exception while decoding one record, or while folding it (``fold.apply``: a bug
there, a hostile value the codec let through), becomes a reject of that record alone, with
the exception's type and message as its reason; the user's state is left as it was before
that record. Only what is not an ``Exception`` (cancellation, interpreter exit) passes
through. Errors of the sink and the broker are not the fold's: they still stop the worker.

A stored state that does not decode (a hostile or corrupt ``session.state`` value, replayed
into the table by recovery) is treated as absent: the user's session starts afresh from the
record in hand, and the stored bytes are themselves dead-lettered, to ``session.state.dlq``
with offset -1 (``BatchResult.unreadable`` names such users, so the app drops the value
from its store and dead-letters it once; the next state written for the user replaces it
in the compacted topic). Rejecting the user's records instead would reject all of them forever,
since nothing else would ever replace the stored value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from recloop.core import codec
from recloop.core.codec import RecordDecodeError
from recloop.core.dlq import MAX_RECORD_BYTES
from recloop.core.events import Feedback, Record, SlateServed, Transition
from recloop.streams import fold
from recloop.streams.fold import FoldConfig, FoldState

log = logging.getLogger(__name__)

# What a record on an unknown topic (faust's agent test channel) may be.
_ANY_INPUT = SlateServed | Feedback


class RawRecord(NamedTuple):
    """One consumed record, as it came off the wire (a tuple: one is made per record)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class BatchResult:
    """What one batch produced.

    ``states`` holds each touched user's new state, encoded, with the partition its records
    came from (the changelog, ``session.state`` and ``rec.transitions`` records go to that
    same partition, which keeps every per-user topic co-partitioned whatever partitioner
    the producers used).
    """

    states: dict[bytes, tuple[int, bytes, FoldState]] = field(default_factory=dict)
    transitions: list[tuple[bytes, int, Transition]] = field(default_factory=list)
    rejects: list[tuple[RawRecord, str]] = field(default_factory=list)
    unreadable: set[bytes] = field(default_factory=set)
    """Users whose stored state did not decode (dead-lettered among ``rejects``, folded
    as absent); a user not also in ``states`` should have the stored value dropped."""


class OversizedRecord(RecordDecodeError):
    """A record over ``MAX_RECORD_BYTES``: refused before any decoding."""

    def __init__(self, expected: str, size: int) -> None:
        super().__init__(
            expected,
            f"record of {size:,} bytes is over the {MAX_RECORD_BYTES:,}-byte limit "
            "(MAX_RECORD_BYTES); not decoded",
        )
        self.size = size


def reason(exc: Exception) -> str:
    """A reject's reason: the message of an expected refusal (``ValueError``: the codec's
    ``RecordDecodeError``, the fold's ``InvalidEvent``), else the exception's type too."""
    if isinstance(exc, ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class BatchFolder:
    """Decodes records for one pair of input topics and folds them with ``recloop.streams.fold``."""

    def __init__(
        self,
        slates_topic: str,
        feedback_topic: str,
        config: FoldConfig,
        state_topic: str = "session.state",
    ) -> None:
        self._decoders: dict[str, Callable[[Any], Record]] = {
            slates_topic: codec.decoder_for(SlateServed),
            feedback_topic: codec.decoder_for(Feedback),
        }
        self._decode_any = codec.decoder_for(_ANY_INPUT)
        self.feedback_topic = feedback_topic
        self.state_topic = state_topic
        self.config = config

    def decode(self, record: RawRecord) -> Record:
        """The event in ``record``; raises ``RecordDecodeError`` or ``ValueError`` if unusable
        (``OversizedRecord`` before decoding anything), or whatever else the codec raised."""
        size = len(record.value or b"") + len(record.key or b"")
        if size > MAX_RECORD_BYTES:
            raise OversizedRecord(record.topic, size)
        event = self._decoders.get(record.topic, self._decode_any)(record.value)
        user_id: str = event.user_id  # type: ignore[attr-defined]
        if record.key != user_id.encode():
            raise ValueError(f"record key {record.key!r} is not its user_id {user_id!r}")
        return event

    def fold(
        self, records: list[RawRecord], load: Callable[[bytes], FoldState | bytes | None]
    ) -> BatchResult:
        """Fold ``records`` in order; ``load(key)`` gives a user's stored state or None.

        A stored state may still be bytes (as recovery restored it) or already decoded. No
        record makes this raise (see the module's docstring): what cannot be decoded or
        folded is a reject.
        """
        result = BatchResult()
        transitions, rejects = result.transitions, result.rejects
        decode, apply, config = self.decode, fold.apply, self.config
        # Per touched user: the state as loaded, the state now, the partition of its records.
        loaded: dict[bytes, FoldState | None] = {}
        current: dict[bytes, FoldState | None] = {}
        partitions: dict[bytes, int] = {}
        fold_failures = 0
        for record in records:
            try:
                event = decode(record)
            except Exception as exc:  # anything: a record must never stop the worker
                rejects.append((record, reason(exc)))
                continue
            key: bytes = record.key  # type: ignore[assignment] # decode checked it
            if key in current:
                state = current[key]
            else:
                stored = self.load_state(key, record.partition, load(key), result)
                state = loaded[key] = current[key] = stored
                partitions[key] = record.partition
            try:
                state, out = apply(state, event, config)
            except fold.InvalidEvent as exc:
                rejects.append((record, str(exc)))
                continue
            except Exception as exc:  # a bug in the fold, or a value the codec let through
                if not fold_failures:  # the traceback once per batch, not once per record
                    log.warning(
                        "streams: the fold raised on %s[%d]@%d; the record is dead-lettered",
                        record.topic, record.partition, record.offset, exc_info=True,
                    )  # fmt: skip
                fold_failures += 1
                rejects.append((record, f"the fold failed: {reason(exc)}"))
                continue
            current[key] = state
            if out:
                partition = partitions[key]
                transitions.extend((key, partition, t) for t in out)
        if fold_failures > 1:
            log.warning("streams: the fold raised on %d records of this batch", fold_failures)
        encode = codec.encode
        for key, state in current.items():
            if state is not None and state.early_feedback:
                current[key] = state = self.take_rejected(key, partitions[key], state, rejects)
            if state is not None and state is not loaded[key]:  # only changed states are written
                result.states[key] = (partitions[key], encode(state), state)
        return result

    def load_state(
        self,
        key: bytes,
        partition: int,
        stored: FoldState | bytes | None,
        result: BatchResult,
    ) -> FoldState | None:
        """``stored`` as a state. One that does not decode joins ``result.rejects`` (for the
        state topic's DLQ, offset -1) and ``key`` joins ``result.unreadable``; the user counts
        as absent (None)."""
        try:
            return as_state(stored)
        except Exception as exc:  # a hostile stored value must not stop the worker either
            raw = bytes(stored) if isinstance(stored, bytes | bytearray | memoryview) else None
            log.warning("streams: the stored state of %r does not decode: %s", key[:100], exc)
            why = f"stored session state does not decode ({reason(exc)}); it counts as absent"
            result.rejects.append((RawRecord(self.state_topic, partition, -1, key, raw), why))
            result.unreadable.add(key)
            return None

    def take_rejected(
        self, key: bytes, partition: int, state: FoldState, rejects: list[tuple[RawRecord, str]]
    ) -> FoldState:
        """``state`` without the buffered feedback it can never use, which joins ``rejects``
        (``fold.take_rejected``; the expiry sweep needs it too: an expired session's
        buffered feedback can never be used)."""
        state, taken = fold.take_rejected(state)
        for feedback, why in taken:
            raw = RawRecord(self.feedback_topic, partition, -1, key, codec.encode(feedback))
            rejects.append((raw, why))
        return state


def decode_state(raw: bytes) -> FoldState:
    """A stored state (the table's and ``session.state``'s value); one over
    ``MAX_RECORD_BYTES`` is refused undecoded (``OversizedRecord``)."""
    if len(raw) > MAX_RECORD_BYTES:
        raise OversizedRecord("SessionState", len(raw))
    return codec.decode(raw, FoldState)


def as_state(stored: FoldState | bytes | None) -> FoldState | None:
    """A table value as a state: decoded once, on first use after recovery."""
    if stored is None or isinstance(stored, FoldState):
        return stored
    return decode_state(stored)
