"""Replay buffers: uniform and prioritised (Schaul et al. 2016, proportional variant).

Both hold arbitrary items (agents store ``Transition`` records, or ``(transition, successor)``
pairs) in a ring of fixed capacity and draw with their own seeded ``np.random.Generator``.

``state_arrays`` / ``load_state_arrays`` snapshot the generator, counters and priorities, and,
with ``with_items=True``, the items themselves (encoded through ``recloop.core.codec``; items must be
``Transition`` or tuples of ``Transition | None | float``). Agents leave the items out by default:
a replay of tens of thousands of transitions would dwarf the weights in every snapshot.

``ReplayConfig`` holds the replay and schedule fields every algorithm's ``Config`` shares, and
``learn_from_replay`` is the loop every agent runs over them: push, then the updates now due.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from recloop.core import codec
from recloop.core.events import Transition

M = TypeVar("M")  # an algorithm's metrics record

_SEP = b"\n"  # compact JSON never contains a raw newline, so it can separate tuple members


def _encode_member(m: Any) -> bytes:
    if m is None:
        return b"null"
    if isinstance(m, Transition):
        return codec.encode(m)
    return repr(float(m)).encode()  # repr round-trips a float exactly


def _decode_member(m: bytes) -> Any:
    if m == b"null":
        return None
    return codec.decode(m, Transition) if m[:1] == b"{" else float(m)


def _encode_item(item: Any) -> bytes:
    """A Transition, or a tuple of Transition | None | float (e.g. a transition and its return)."""
    if isinstance(item, Transition):
        return b"T" + codec.encode(item)
    return b"P" + _SEP.join(_encode_member(m) for m in item)


def _decode_item(blob: bytes) -> Any:
    if blob[:1] == b"T":
        return codec.decode(blob[1:], Transition)
    return tuple(_decode_member(m) for m in blob[1:].split(_SEP))


def items_to_arrays(items: Sequence[Any]) -> dict[str, np.ndarray]:
    """Encode items (see ``_encode_item``) as ``items_blob`` (uint8) + ``items_len`` (int64)."""
    blobs = [_encode_item(it) for it in items]
    return {"items_blob": np.frombuffer(b"".join(blobs), np.uint8).copy(),
            "items_len": np.array([len(b) for b in blobs], np.int64)}


def items_from_arrays(arrays: dict[str, np.ndarray]) -> list[Any]:
    """Inverse of ``items_to_arrays``."""
    blob, ends = arrays["items_blob"].tobytes(), np.cumsum(arrays["items_len"])
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return [_decode_item(blob[s:e]) for s, e in zip(starts, ends, strict=True)]


def rng_to_array(rng: np.random.Generator) -> np.ndarray:
    return np.frombuffer(json.dumps(rng.bit_generator.state).encode(), np.uint8).copy()


def rng_from_array(arr: np.ndarray) -> np.random.Generator:
    state = json.loads(np.asarray(arr, np.uint8).tobytes().decode())
    rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
    rng.bit_generator.state = state
    return rng


def due_updates(
    credit: int, stored: int, update_every: int, learning_starts: int, capacity: int
) -> tuple[int, int]:
    """The update schedule every agent shares: how many updates are due, and credit left.

    One update per ``update_every`` new transitions of credit, none until the replay holds
    ``min(learning_starts, capacity)`` transitions (credit keeps accruing meanwhile).
    """
    if stored < min(learning_starts, capacity):
        return 0, credit
    n = credit // update_every
    return n, credit - n * update_every


@dataclass(frozen=True)
class ReplayConfig:
    """The replay and schedule fields of every algorithm's ``Config``, which subclasses it
    (redeclaring a field only to change its default)."""

    batch_size: int = 64
    """Transitions per update."""
    replay_capacity: int = 50_000
    """Transitions kept for replay."""
    update_every: int = 1
    """One update per this many new transitions."""
    learning_starts: int = 64
    """No update before the replay holds this many transitions."""
    snapshot_replay: bool = False
    """Put the replay contents in snapshots, so a resumed learner continues exactly
    (off by default: a full replay dwarfs the weights)."""


class ReplayBuffer:
    """Uniform replay: ``push`` items, ``sample(n)`` draws n with replacement."""

    def __init__(self, capacity: int, seed: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self._items: list[Any] = []
        self._next = 0  # ring position of the next write once full
        self.pushed = 0

    def __len__(self) -> int:
        return len(self._items)

    def _write(self, item: Any) -> int:
        if len(self._items) < self.capacity:
            self._items.append(item)
            slot = len(self._items) - 1
        else:
            slot = self._next
            self._items[slot] = item
        self._next = (slot + 1) % self.capacity
        self.pushed += 1
        return slot

    def push(self, items: Sequence[Any]) -> None:
        for item in items:
            self._write(item)

    def sample(self, n: int) -> list[Any]:
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self.rng.integers(0, len(self._items), size=n)
        return [self._items[i] for i in idx]

    def state_arrays(self, with_items: bool = False) -> dict[str, np.ndarray]:
        out = {
            "rng": rng_to_array(self.rng),
            "counters": np.array([self._next, self.pushed, len(self._items)], np.int64),
        }
        if with_items:
            out.update(items_to_arrays(self._items))
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.rng = rng_from_array(arrays["rng"])
        self._next, self.pushed, size = (int(x) for x in arrays["counters"])
        if "items_blob" in arrays:
            self._items = items_from_arrays(arrays)
        elif size != len(self._items):
            # Items were not snapshotted: keep what this buffer holds (usually empty).
            self._next = len(self._items) % self.capacity


class PrioritisedReplay(ReplayBuffer):
    """Proportional prioritised replay: P(i) = p_i^alpha / sum_j p_j^alpha.

    ``sample`` returns ``(items, slots, weights)`` with importance weights
    ``(len * P(i))^-beta / max`` (Schaul et al. eq. 1 and the IS correction). New items get the
    largest priority seen so far, so each is replayed at least once with high probability.
    Priorities live in a plain array: sampling is O(capacity), fine at recloop's sizes.
    """

    def __init__(self, capacity: int, seed: int, alpha: float = 0.6, beta: float = 0.4,
                 eps: float = 1e-3) -> None:
        super().__init__(capacity, seed)
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.priorities = np.zeros(capacity, np.float64)
        self.max_priority = 1.0

    def push(self, items: Sequence[Any]) -> None:
        for item in items:
            self.priorities[self._write(item)] = self.max_priority

    def sample(self, n: int) -> tuple[list[Any], np.ndarray, np.ndarray]:  # type: ignore[override]
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        p = self.priorities[: len(self._items)] ** self.alpha
        probs = p / p.sum()
        slots = self.rng.choice(len(self._items), size=n, p=probs)
        weights = (len(self._items) * probs[slots]) ** (-self.beta)
        return [self._items[i] for i in slots], slots, (weights / weights.max()).astype(np.float32)

    def update_priorities(self, slots: np.ndarray, td_errors: np.ndarray) -> None:
        pr = np.abs(np.asarray(td_errors, np.float64)) + self.eps
        self.priorities[np.asarray(slots)] = pr
        self.max_priority = max(self.max_priority, float(pr.max()))

    def state_arrays(self, with_items: bool = False) -> dict[str, np.ndarray]:
        out = super().state_arrays(with_items)
        out["priorities"] = self.priorities.copy()
        out["max_priority"] = np.array([self.max_priority])
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        self.priorities = np.asarray(arrays["priorities"], np.float64).copy()
        self.max_priority = float(arrays["max_priority"][0])


def learn_from_replay(replay: ReplayBuffer, config: ReplayConfig, entering: Sequence[Any],
                      credit: int, update: Callable[[Any], M],
                      ) -> tuple[M | None, int]:
    """Pushes ``entering`` into replay, then runs the updates now due (``due_updates``), each
    ``update(replay.sample(batch_size))``. Returns the last update's metrics (None when none
    was due) and the credit left over for the next call."""
    replay.push(entering)
    n, credit = due_updates(credit + len(entering), len(replay), config.update_every,
                            config.learning_starts, config.replay_capacity)
    metrics: M | None = None
    for _ in range(n):
        metrics = update(replay.sample(config.batch_size))
    return metrics, credit

