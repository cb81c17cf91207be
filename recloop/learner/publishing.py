"""What the learner service decides besides the agent, as pure functions (no I/O).

- **Dedupe window.** The ids of the last ``window`` applied transitions are remembered (and
  saved with each snapshot); a re-delivered transition whose id is in the window is dropped.
- **Digest.** ``id_digest`` is the sum of the ids' 64-bit BLAKE2b hashes mod 2^64: order
  independent, and a duplicate adds a hash twice while a gap leaves one out, so equal
  digests and equal counts mean the same set was applied exactly once.
- **Schedule.** Publish after ``every_transitions`` newly applied transitions, or after
  ``every_s`` seconds with at least one.
- **Manifest.** What a snapshot's ``manifest.json`` says about the service: offsets, counts,
  digest, newest event time and seed, with the agent's finite metrics.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DIGEST_MOD = 1 << 64
APPLIED_IDS_KEY = "__service.applied_ids"
"""The tensor of a snapshot that holds the dedupe window's ids."""


def id_digest(transition_ids: Iterable[str], start: int = 0) -> int:
    """``start`` plus the hashes of ``transition_ids``, mod 2^64 (see the module docstring)."""
    total = start
    for tid in transition_ids:
        digest = hashlib.blake2b(tid.encode(), digest_size=8).digest()
        total = (total + int.from_bytes(digest, "big")) % DIGEST_MOD
    return total


def pack_ids(ids: Iterable[str]) -> np.ndarray:
    """Ids as one uint8 tensor (newline-separated), since safetensors holds only arrays."""
    return np.frombuffer("\n".join(ids).encode(), np.uint8).copy()


def unpack_ids(packed: np.ndarray) -> list[str]:
    text = packed.tobytes().decode()
    return text.split("\n") if text else []


class DedupeWindow:
    """The last ``size`` ids seen, with O(1) membership."""

    def __init__(self, size: int, ids: Iterable[str] = ()) -> None:
        if size < 1:
            raise ValueError("the dedupe window must hold at least one id")
        self.size = size
        self.ids: deque[str] = deque()
        self._set: set[str] = set()
        for tid in ids:
            self.remember(tid)

    def __contains__(self, tid: str) -> bool:
        return tid in self._set

    def __len__(self) -> int:
        return len(self.ids)

    def remember(self, tid: str) -> None:
        self.ids.append(tid)
        self._set.add(tid)
        while len(self.ids) > self.size:
            self._set.discard(self.ids.popleft())

    def fresh(self, tids: Iterable[str]) -> list[bool]:
        """For each id, whether it is new (and then remember it); a repeat within the same
        batch is a duplicate too."""
        out = []
        for tid in tids:
            new = tid not in self._set
            if new:
                self.remember(tid)
            out.append(new)
        return out


@dataclass(frozen=True)
class PublishSchedule:
    """When a snapshot is due."""

    every_transitions: int = 500
    every_s: float = 10.0

    def due(self, unpublished: int, seconds_since_publish: float) -> bool:
        if unpublished >= self.every_transitions:
            return True
        return unpublished > 0 and seconds_since_publish >= self.every_s


@dataclass
class Progress:
    """What the service has applied and read, besides the agent itself."""

    version: int = 0
    transitions_applied: int = 0
    duplicates_dropped: int = 0
    applied_digest: int = 0
    newest_event_ts: float = 0.0
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)

    def consumed(self, topic: str, partition: int, offset: int) -> None:
        """Record that ``offset`` of ``topic[partition]`` was handled (applied or dropped)."""
        self.offsets.setdefault(topic, {})[str(partition)] = offset + 1

    def applied(self, transition_ids: list[str], newest_ts: float) -> None:
        self.transitions_applied += len(transition_ids)
        self.applied_digest = id_digest(transition_ids, self.applied_digest)
        self.newest_event_ts = max(self.newest_event_ts, newest_ts)

    def start_offset(self, topic: str, partition: int) -> int | None:
        offset = self.offsets.get(topic, {}).get(str(partition))
        return None if offset is None else int(offset)


def compose_manifest(
    algorithm: str,
    agent_config: dict,
    spec: dict,
    metrics: Mapping[str, float],
    progress: Progress,
    seed: int,
) -> dict[str, Any]:
    """The manifest of the snapshot that covers ``progress`` (non-finite metrics dropped)."""
    return {
        "algorithm": algorithm,
        "config": agent_config,
        "spec": spec,
        "metrics": {k: float(v) for k, v in metrics.items() if math.isfinite(v)},
        "consumed_offsets": {t: dict(p) for t, p in progress.offsets.items()},
        "transitions_applied": progress.transitions_applied,
        "service": {
            "applied_digest": str(progress.applied_digest),
            "duplicates_dropped": progress.duplicates_dropped,
            "newest_event_ts": progress.newest_event_ts,
            "seed": seed,
        },
    }


def progress_from_manifest(manifest: Mapping[str, Any]) -> Progress:
    """The ``Progress`` a snapshot's manifest records (resume after a crash)."""
    service = manifest["service"]
    return Progress(
        version=int(manifest["version"]),
        transitions_applied=int(manifest["transitions_applied"]),
        duplicates_dropped=int(service["duplicates_dropped"]),
        applied_digest=int(service["applied_digest"]),
        newest_event_ts=float(service.get("newest_event_ts", 0.0)),
        offsets={t: dict(p) for t, p in manifest["consumed_offsets"].items()},
    )
