"""The in-memory ``Bus``: the topics of one process, deterministic, for tests and experiments.

Rules, chosen to match what the services rely on from Kafka:

- a topic has ``partitions`` append-only logs; a keyed record goes to partition
  ``blake2b(key) mod partitions`` (a user's records share one partition on every topic, as
  the topic table asks), an unkeyed one to partition 0;
- ``publish`` is acknowledged at once, so ``flush`` has nothing to wait for; ``fail_next``
  makes the next ``flush`` raise, as a broker that lost a record would;
- each group has committed offsets per partition; a consumer starts at ``start_at``'s
  answer, else the committed offset, else 0 (or the current end with ``from_end``). One
  member per group: it owns every partition of its topics;
- ``poll`` returns records in a fixed order (topics in the order given, partitions
  ascending, offsets ascending) and never waits: the same publishes give the same polls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from recloop.core.ports import BusMessage, Positions


class DeliveryFailed(RuntimeError):
    """``flush`` was told to fail (see ``MemoryBus.fail_next``)."""


def partition_of(key: bytes | None, partitions: int) -> int:
    """The partition of ``key``: BLAKE2b of the key bytes, modulo the partition count."""
    if key is None:
        return 0
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


class MemoryBus:
    """Topics held in lists; see the module docstring for the rules."""

    def __init__(self, partitions: int = 4) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.partitions = partitions
        self._logs: dict[str, list[list[BusMessage]]] = {}
        self.committed: dict[str, Positions] = {}
        self.published = 0
        self._fail: str | None = None

    # -- producing ---------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        partition = partition_of(key, self.partitions)
        log = self._log(topic)[partition]
        log.append(BusMessage(topic, partition, len(log), key, value, tuple(headers),
                              self.published))  # fmt: skip
        self.published += 1

    def flush(self, timeout: float | None = None) -> None:
        if self._fail is not None:
            reason, self._fail = self._fail, None
            raise DeliveryFailed(reason)

    def serve(self) -> None:
        """Nothing is queued in memory."""

    def fail_next(self, reason: str = "delivery failed") -> None:
        """Make the next ``flush`` raise ``DeliveryFailed`` (for failure tests)."""
        self._fail = reason

    # -- reading -----------------------------------------------------------------------------

    def records(self, topic: str) -> list[BusMessage]:
        """Every record of ``topic``, partition by partition (for tools and tests)."""
        return [m for log in self._log(topic) for m in log]

    def end(self, topic: str, partition: int) -> int:
        return len(self._log(topic)[partition])

    def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        from_end: bool = False,
        start_at: Callable[[str, int], int | None] | None = None,
        tuning: Mapping[str, Any] | None = None,
    ) -> MemoryConsumer:
        committed = self.committed.setdefault(group, {})
        if from_end:
            for topic in topics:
                for p in range(self.partitions):
                    committed[(topic, p)] = self.end(topic, p)
        positions: Positions = {}
        for topic in topics:
            for p in range(self.partitions):
                chosen = start_at(topic, p) if start_at is not None else None
                positions[(topic, p)] = chosen if chosen is not None else committed.get((topic, p), 0)
        return MemoryConsumer(self, list(topics), group, positions)

    def _log(self, topic: str) -> list[list[BusMessage]]:
        logs = self._logs.get(topic)
        if logs is None:
            logs = self._logs[topic] = [[] for _ in range(self.partitions)]
        return logs


class MemoryConsumer:
    """The one member of a group on a ``MemoryBus``."""

    def __init__(self, bus: MemoryBus, topics: list[str], group: str, positions: Positions):
        self._bus = bus
        self._topics = topics
        self.group = group
        self._positions = positions
        self.closed = False

    def poll(self, max_records: int, timeout: float = 0.0) -> list[BusMessage]:
        if self.closed:
            raise RuntimeError("poll on a closed consumer")
        out: list[BusMessage] = []
        for topic in self._topics:
            for p, log in enumerate(self._bus._log(topic)):
                position = self._positions[(topic, p)]
                take = log[position : position + max_records - len(out)]
                out += take
                self._positions[(topic, p)] = position + len(take)
                if len(out) >= max_records:
                    return out
        return out

    def commit(self, positions: Positions) -> None:
        self._bus.committed.setdefault(self.group, {}).update(positions)

    def assigned(self) -> bool:
        return not self.closed

    def caught_up(self) -> bool:
        return not self.closed and all(
            position >= self._bus.end(topic, p) for (topic, p), position in self._positions.items()
        )

    def close(self) -> None:
        self.closed = True
