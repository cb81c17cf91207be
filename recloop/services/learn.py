"""The online learner service: transitions in, versioned snapshots out.

Loop: poll a batch of ``rec.transitions`` (dead-lettering what does not decode), drop
transitions already applied (by id), feed the rest to the agent's ``learn_many`` (the agent
owns its update schedule), and every N transitions or T seconds publish a snapshot:

1. ``weights.safetensors`` + ``manifest.json`` written atomically (recloop.core.snapshot), with the
   consumed offsets, the applied-transition count and digest, and the ids applied recently;
2. recorded in storage;
3. announced on ``policy.snapshots``;
4. only then are the Kafka offsets committed.

After a crash the service resumes from the latest snapshot: its tensors restore the agent
exactly, its offsets say where to read from, and its id window drops anything re-delivered
between the snapshot and the last commit. So no transition is lost or applied twice, and the
manifest carries the evidence (``transitions_applied`` and ``applied_digest``, a sum of the
ids' hashes that any duplicate or gap would change).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition

from recloop import metrics
from recloop.core import codec
from recloop.core.events import PolicyPublished, Transition
from recloop.core.settings import Settings
from recloop.core.snapshot import (
    SnapshotRef,
    announced_path,
    latest_snapshot,
    read_snapshot,
    write_snapshot,
)
from recloop.kafka.clients import DeliveryTracker, flush_or_raise, make_producer
from recloop.kafka.dlq import DeadLetterConsumer
from recloop.learner import registry
from recloop.learner.spec import WorldSpec
from recloop.storage.store import Storage

log = logging.getLogger(__name__)

_DIGEST_MOD = 1 << 64
_APPLIED_IDS_KEY = "__service.applied_ids"


def id_digest(transition_ids: Iterable[str]) -> int:
    """Order-independent digest of a multiset of transition ids (sum of hashes mod 2^64).

    A duplicate adds its hash twice and a gap leaves one out, so equal digests and equal
    counts mean the same set was applied exactly once.
    """
    total = 0
    for tid in transition_ids:
        digest = hashlib.blake2b(tid.encode(), digest_size=8).digest()
        total = (total + int.from_bytes(digest, "big")) % _DIGEST_MOD
    return total


def _pack_ids(ids: Iterable[str]) -> np.ndarray:
    """Ids as one uint8 tensor (newline-separated), since safetensors holds only arrays."""
    return np.frombuffer("\n".join(ids).encode(), np.uint8).copy()


def _unpack_ids(packed: np.ndarray) -> list[str]:
    text = packed.tobytes().decode()
    return text.split("\n") if text else []


@dataclass(frozen=True)
class LearnConfig:
    """How the learner service runs (the algorithm's own knobs live in its Config)."""

    algo: str
    policy: str
    seed: int = 0
    snapshot_every_transitions: int = 500
    """Publish after this many newly applied transitions..."""
    snapshot_every_s: float = 10.0
    """...or after this many seconds with at least one new transition."""
    poll_max: int = 256
    """Most transitions per poll; a snapshot waits for the batch it is in, so keep it small."""
    poll_timeout_s: float = 0.5
    dedupe_window: int = 200_000
    """How many recent transition ids are remembered (and saved) to drop re-deliveries."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Algorithm Config overrides."""


@dataclass
class LearnerState:
    """What the service knows besides the agent: progress and the dedupe window."""

    version: int = 0
    transitions_applied: int = 0
    duplicates_dropped: int = 0
    applied_digest: int = 0
    newest_event_ts: float = 0.0
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    recent_ids: deque[str] = field(default_factory=deque)
    recent_set: set[str] = field(default_factory=set)

    def remember(self, tid: str, window: int) -> None:
        self.recent_ids.append(tid)
        self.recent_set.add(tid)
        while len(self.recent_ids) > window:
            self.recent_set.discard(self.recent_ids.popleft())


class LearnerService:
    """One learner process: owns the agent, the consumer and the snapshot schedule."""

    def __init__(
        self,
        settings: Settings,
        config: LearnConfig,
        spec: WorldSpec,
        storage: Storage,
        on_publish: Callable[[SnapshotRef], None] | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.spec = spec
        self.storage = storage
        self.on_publish = on_publish
        self.snapshot_root = settings.resolved_snapshot_dir
        self.agent = registry.make_agent(config.algo, spec, config.seed, **config.overrides)
        self.state = LearnerState()
        self.metrics: dict[str, float] = {}
        self.last_publish = time.monotonic()
        self.unpublished = 0
        self._last_lag_check = 0.0
        self._last_ts_ms: dict[int, int] = {}
        self._resume()
        self.consumer = DeadLetterConsumer(
            settings,
            ["rec.transitions"],
            group_id=self.group_id,
            name=f"learner:{config.policy}",
            consumer_config={"auto.offset.reset": "earliest"},
            on_assign=self._on_assign,
        )
        self.producer = make_producer(settings)
        self.deliveries = DeliveryTracker()
        self._lag_consumer = Consumer({
            **settings.kafka_client_config(), "group.id": f"{self.group_id}-lag-probe",
        })  # fmt: skip
        self._closed = threading.Event()
        self._lag_thread = threading.Thread(target=self._watch_lag, daemon=True)
        self._lag_thread.start()

    @property
    def group_id(self) -> str:
        return f"{self.settings.topic_prefix}recloop-learner-{self.config.policy}"

    # -- resume ----------------------------------------------------------------------------

    def _resume(self) -> None:
        ref = latest_snapshot(self.snapshot_root, self.config.policy)
        if ref is None:
            return
        tensors, manifest = read_snapshot(ref.path, ref.weights_sha256, ref.manifest_sha256)
        ids = _unpack_ids(tensors.pop(_APPLIED_IDS_KEY, np.zeros(0, np.uint8)))
        self.agent.load_state_tensors(tensors)
        service = manifest["service"]
        self.state = LearnerState(
            version=int(manifest["version"]),
            transitions_applied=int(manifest["transitions_applied"]),
            duplicates_dropped=int(service["duplicates_dropped"]),
            applied_digest=int(service["applied_digest"]),
            newest_event_ts=float(service.get("newest_event_ts", 0.0)),
            offsets={t: dict(p) for t, p in manifest["consumed_offsets"].items()},
        )
        for tid in ids:
            self.state.remember(tid, self.config.dedupe_window)
        # A crash between writing and recording leaves the row missing: record it again.
        self.storage.record_snapshot(ref.meta())
        log.info(
            "resumed %s from v%d (%d applied)",
            self.config.policy,
            ref.version,
            self.state.transitions_applied,
        )

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Start each partition where the latest snapshot stopped, not where Kafka last saw us.

        Offsets are committed after the snapshot is durable, so the two agree except after a
        crash in between; the snapshot is the truth.
        """
        for tp in partitions:
            offset = self.state.offsets.get(tp.topic, {}).get(str(tp.partition))
            if offset is not None:
                tp.offset = int(offset)
        consumer.assign(partitions)

    # -- loop ------------------------------------------------------------------------------

    def step(self) -> int:
        """Poll once, learn from what is new, publish if due; returns transitions applied."""
        batch = self.consumer.poll_batch(self.config.poll_max, self.config.poll_timeout_s)
        fresh: list[Transition] = []
        policy = self.config.policy
        for consumed in batch:
            self._last_ts_ms[consumed.partition] = consumed.timestamp_ms
            transition: Transition = consumed.value  # type: ignore[assignment]
            tid = transition.transition_id
            partitions = self.state.offsets.setdefault(consumed.topic, {})
            partitions[str(consumed.partition)] = consumed.offset + 1
            if tid in self.state.recent_set:
                self.state.duplicates_dropped += 1
                metrics.DUPLICATES_DROPPED.labels(policy).inc()
                continue
            self.state.remember(tid, self.config.dedupe_window)
            fresh.append(transition)
        if fresh:
            self.metrics = dict(self.agent.learn_many(fresh))
            self.state.transitions_applied += len(fresh)
            self.state.applied_digest = (
                self.state.applied_digest + id_digest(t.transition_id for t in fresh)
            ) % _DIGEST_MOD
            self.unpublished += len(fresh)
            metrics.TRANSITIONS_APPLIED.labels(policy).inc(len(fresh))
            newest = max(t.outcome_ts for t in fresh)
            self.state.newest_event_ts = max(self.state.newest_event_ts, newest)
        if self._publish_due():
            self.publish()
        return len(fresh)

    def update_lag(self) -> dict[int, int]:
        """Messages behind the log end per partition (also exported as gauges).

        Reads watermarks with its own consumer, so a watcher thread can call it while the
        main loop is busy learning: lag is most worth seeing exactly when learning is slow.
        """
        self._last_lag_check = time.monotonic()
        topic = self.settings.topics.transitions
        applied = dict(self.state.offsets.get(topic, {}))  # copy: the loop may be writing
        lags: dict[int, int] = {}
        for partition in range(self.settings.partitions):
            tp = TopicPartition(topic, partition)
            low, high = self._lag_consumer.get_watermark_offsets(tp, timeout=2, cached=False)
            position = int(applied.get(str(partition), low))
            behind = max(0, high - position)
            lags[partition] = behind
            labels = (self.config.policy, str(partition))
            metrics.LEARNER_LAG_MESSAGES.labels(*labels).set(behind)
            last_ms = self._last_ts_ms.get(partition)
            seconds = 0.0 if not behind or last_ms is None else time.time() - last_ms / 1000
            metrics.LEARNER_LAG_SECONDS.labels(*labels).set(max(0.0, seconds))
        return lags

    def _watch_lag(self) -> None:
        while not self._closed.wait(1.0):
            with contextlib.suppress(Exception):  # a metric must never stop the learner
                self.update_lag()

    def _publish_due(self) -> bool:
        if self.unpublished >= self.config.snapshot_every_transitions:
            return True
        elapsed = time.monotonic() - self.last_publish
        return self.unpublished > 0 and elapsed >= self.config.snapshot_every_s

    def run(self, should_stop: Callable[[], bool], max_seconds: float | None = None) -> None:
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not should_stop() and (deadline is None or time.monotonic() < deadline):
                self.step()
            if self.unpublished:
                self.publish()
        finally:
            self.close()

    # -- publish ---------------------------------------------------------------------------

    def publish(self) -> SnapshotRef:
        """Write, record and announce a snapshot, then commit the offsets it covers."""
        version = self.state.version + 1
        tensors = dict(self.agent.state_tensors())
        tensors[_APPLIED_IDS_KEY] = _pack_ids(self.state.recent_ids)
        manifest = {
            "algorithm": self.config.algo,
            "config": self.agent.config_dict(),
            "spec": self.spec.to_dict(),
            "metrics": {k: float(v) for k, v in self.metrics.items() if np.isfinite(v)},
            "consumed_offsets": self.state.offsets,
            "transitions_applied": self.state.transitions_applied,
            "service": {
                "applied_digest": str(self.state.applied_digest),
                "duplicates_dropped": self.state.duplicates_dropped,
                "newest_event_ts": self.state.newest_event_ts,
                "seed": self.config.seed,
            },
        }
        ref = write_snapshot(self.snapshot_root, self.config.policy, version, tensors, manifest)
        self.storage.record_snapshot(ref.meta())
        announcement = PolicyPublished(
            policy=self.config.policy,
            algorithm=self.config.algo,
            version=version,
            path=announced_path(self.snapshot_root, ref.path),
            weights_sha256=ref.weights_sha256,
            manifest_sha256=ref.manifest_sha256,
            created_ts=ref.created_ts,
            transitions_applied=self.state.transitions_applied,
            metrics=manifest["metrics"],
        )
        self.producer.produce(
            self.settings.topics.snapshots,
            key=self.config.policy.encode(),
            value=codec.encode(announcement),
            on_delivery=self.deliveries,
        )
        flush_or_raise(self.producer, self.deliveries)
        self.consumer.commit()
        self.state.version = version
        metrics.SNAPSHOT_VERSION.labels("learner", self.config.policy).set(version)
        metrics.SNAPSHOT_CREATED.labels("learner", self.config.policy).set(ref.created_ts)
        self.unpublished = 0
        self.last_publish = time.monotonic()
        if self.on_publish:
            self.on_publish(ref)
        return ref

    def close(self) -> None:
        self._closed.set()
        self._lag_thread.join(5)
        self._lag_consumer.close()
        self.consumer.close()
        self.producer.flush(10)


def snapshot_root(settings: Settings) -> Path:
    return settings.resolved_snapshot_dir
