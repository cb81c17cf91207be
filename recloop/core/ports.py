"""Protocols the layers meet at: what a slate policy and a snapshot store look like."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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
