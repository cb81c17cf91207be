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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from recloop.core import codec
from recloop.core.codec import RecordDecodeError
from recloop.core.events import Feedback, Record, SlateServed, Transition
from recloop.streams import fold
from recloop.streams.fold import FoldConfig, FoldState

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


class BatchFolder:
    """Decodes records for one pair of input topics and folds them with ``recloop.streams.fold``."""

    def __init__(self, slates_topic: str, feedback_topic: str, config: FoldConfig) -> None:
        self._decoders: dict[str, Callable[[Any], Record]] = {
            slates_topic: codec.decoder_for(SlateServed),
            feedback_topic: codec.decoder_for(Feedback),
        }
        self._decode_any = codec.decoder_for(_ANY_INPUT)
        self.feedback_topic = feedback_topic
        self.config = config

    def decode(self, record: RawRecord) -> Record:
        """The event in ``record``; raises ``RecordDecodeError`` or ``ValueError`` if unusable."""
        event = self._decoders.get(record.topic, self._decode_any)(record.value)
        user_id: str = event.user_id  # type: ignore[attr-defined]
        if record.key != user_id.encode():
            raise ValueError(f"record key {record.key!r} is not its user_id {user_id!r}")
        return event

    def fold(
        self, records: list[RawRecord], load: Callable[[bytes], FoldState | bytes | None]
    ) -> BatchResult:
        """Fold ``records`` in order; ``load(key)`` gives a user's stored state or None.

        A stored state may still be bytes (as recovery restored it) or already decoded.
        """
        result = BatchResult()
        transitions, rejects = result.transitions, result.rejects
        decode, apply, config = self.decode, fold.apply, self.config
        # Per touched user: the state as loaded, the state now, the partition of its records.
        loaded: dict[bytes, FoldState | None] = {}
        current: dict[bytes, FoldState | None] = {}
        partitions: dict[bytes, int] = {}
        for record in records:
            try:
                event = decode(record)
            except (RecordDecodeError, ValueError) as exc:
                rejects.append((record, str(exc)))
                continue
            key: bytes = record.key  # type: ignore[assignment] # decode checked it
            if key in current:
                state = current[key]
            else:
                state = loaded[key] = current[key] = as_state(load(key))
                partitions[key] = record.partition
            try:
                state, out = apply(state, event, config)
            except fold.InvalidEvent as exc:
                rejects.append((record, str(exc)))
                continue
            current[key] = state
            if out:
                partition = partitions[key]
                transitions.extend((key, partition, t) for t in out)
        encode = codec.encode
        for key, state in current.items():
            if state is not None and state.early_feedback:
                current[key] = state = self.take_rejected(key, partitions[key], state, rejects)
            if state is not None and state is not loaded[key]:  # only changed states are written
                result.states[key] = (partitions[key], encode(state), state)
        return result

    def take_rejected(
        self, key: bytes, partition: int, state: FoldState, rejects: list[tuple[RawRecord, str]]
    ) -> FoldState:
        """``state`` without the buffered feedback it can never use, which joins ``rejects``
        (``fold.take_rejected``; the expiry sweep needs it too: an expired session's
        buffered feedback can never be used)."""
        state, taken = fold.take_rejected(state)
        for feedback, reason in taken:
            raw = RawRecord(self.feedback_topic, partition, -1, key, codec.encode(feedback))
            rejects.append((raw, reason))
        return state


def decode_state(raw: bytes) -> FoldState:
    """A stored state (the table's and ``session.state``'s value)."""
    return codec.decode(raw, FoldState)


def as_state(stored: FoldState | bytes | None) -> FoldState | None:
    """A table value as a state: decoded once, on first use after recovery."""
    if stored is None or isinstance(stored, FoldState):
        return stored
    return decode_state(stored)
