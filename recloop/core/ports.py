"""Protocols the layers meet at: a slate policy, a snapshot store, and the bus."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Observation:
    """What a policy sees of the user when asked for a slate.

    ``history`` are the user's recent positively-answered items, oldest first.
    """

    user_id: str
    user_obs: np.ndarray  # float32, shape (U,)
    history: tuple[int, ...] = ()
    history_rewards: tuple[float, ...] = ()
    step: int = 0


@dataclass(frozen=True)
class Candidates:
    """The items a slate may be drawn from, with one row of observable features each.

    ``features_NF`` may have zero columns for worlds where items are known by id only.
    """

    ids: np.ndarray  # int64, shape (N,)
    features_NF: np.ndarray  # float32, shape (N, F)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Slate:
    """A policy's answer: item ids, their scores, and per-item propensities."""

    items: np.ndarray  # int64, shape (K,), distinct
    scores: np.ndarray  # float, shape (K,)
    propensities: np.ndarray  # float in [0, 1], shape (K,)
    info: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class SlatePolicy(Protocol):
    """Anything that answers a request with a slate of ``k`` distinct candidates."""

    name: str

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate: ...


@runtime_checkable
class SnapshotStore(Protocol):
    """Where snapshot metadata lives (storage implements it)."""

    def record_snapshot(self, meta: dict) -> None: ...

    def latest_snapshot(self, policy: str) -> dict | None: ...


@dataclass(frozen=True)
class BusMessage:
    """One record as a bus carries it: raw bytes and where it sits in its topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0


Positions = dict[tuple[str, int], int]
"""Next offset to read per (topic, partition): one past the last record handled."""


@runtime_checkable
class BusConsumer(Protocol):
    """One member of a consumer group, reading every partition assigned to it."""

    def poll(self, max_records: int, timeout: float) -> list[BusMessage]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds (0: never)."""
        ...

    def commit(self, positions: Positions) -> None:
        """Make ``positions`` the group's committed offsets (synchronously)."""
        ...

    def assigned(self) -> bool:
        """Whether the group has given this member its partitions yet."""
        ...

    def caught_up(self) -> bool:
        """Whether this member has partitions and has read each to its end as of now."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Bus(Protocol):
    """Where the services meet: topics of ``recloop.core.topics`` partitioned by key.

    ``publish`` may queue; ``flush`` returns only once every record published so far is
    acknowledged, and raises if one was not (without a ``timeout`` it waits as long as the
    bus keeps retrying, so a broker outage of minutes is waited out). A consumer's group
    starts at its committed offsets, else at the start of each partition, or at the current end with ``from_end``;
    ``start_at(topic, partition)`` may override the start per partition (the learner
    resumes where its snapshot stopped).
    """

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def serve(self) -> None:
        """Hand queued records on and serve delivery reports, without blocking."""
        ...

    def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        from_end: bool = False,
        start_at: Callable[[str, int], int | None] | None = None,
        tuning: Mapping[str, Any] | None = None,
    ) -> BusConsumer: ...
