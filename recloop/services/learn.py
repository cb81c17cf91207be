"""The online learner service: transitions in, versioned snapshots out, over a ``Bus``.

Loop (``step``): poll a batch of ``rec.transitions`` (dead-lettering what does not decode),
drop transitions already applied (by id, ``learner.publishing.DedupeWindow``), feed the rest
to the agent's ``learn_many`` (the agent owns its update schedule), and when the
``PublishSchedule`` says so publish a snapshot:

1. ``weights.safetensors`` + ``manifest.json`` written atomically (``DiskSnapshots``), with
   the consumed offsets, the applied-transition count and digest, and the ids applied
   recently; recorded in storage;
2. announced on ``policy.snapshots``;
3. only then are the offsets committed.

After a crash the service resumes from the latest snapshot: its tensors restore the agent
exactly, its offsets say where to read from, and its id window drops anything re-delivered
between the snapshot and the last commit. So no transition is lost or applied twice, and the
manifest carries the evidence (``transitions_applied`` and ``applied_digest``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recloop import metrics
from recloop.core import codec
from recloop.core.events import PolicyPublished, Transition
from recloop.core.ports import Bus
from recloop.core.settings import Settings
from recloop.core.spec import WorldSpec
from recloop.kafka.deadletter import Reader
from recloop.learner import publishing, registry
from recloop.learner.publishing import id_digest
from recloop.services.learn_snapshots import DiskSnapshots, Snapshots

__all__ = ["DiskSnapshots", "LearnConfig", "LearnerService", "Snapshots", "id_digest"]

log = logging.getLogger(__name__)


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


class LearnerService:
    """One learner: owns the agent, its reader of ``rec.transitions`` and the schedule."""

    def __init__(
        self,
        settings: Settings,
        config: LearnConfig,
        spec: WorldSpec,
        storage: Any = None,
        on_publish: Callable[[Any], None] | None = None,
        *,
        bus: Bus | None = None,
        snapshots: Snapshots | None = None,
        agent: Any = None,
    ) -> None:
        self.settings, self.config, self.spec, self.on_publish = settings, config, spec, on_publish
        self.topics = settings.topics
        self.snapshots = snapshots or DiskSnapshots(settings.resolved_snapshot_dir, storage)
        self.agent = agent or registry.make_agent(config.algo, spec, config.seed,
                                                  **config.overrides)  # fmt: skip
        self.progress = publishing.Progress()
        self.window = publishing.DedupeWindow(config.dedupe_window)
        self.schedule = publishing.PublishSchedule(config.snapshot_every_transitions,
                                                   config.snapshot_every_s)  # fmt: skip
        self.metrics: dict[str, float] = {}
        self.last_publish = time.monotonic()
        self.unpublished = 0
        self._resume()
        self.lag = None
        if bus is None:
            from recloop.kafka.bus import KafkaBus
            from recloop.kafka.learner_lag import LagWatcher

            bus = KafkaBus(settings, process="learner")
            self.lag = LagWatcher(settings, self.group_id, config.policy, self.progress)
        self.bus = bus
        self.reader = Reader(
            bus, self.topics, ["rec.transitions"], self.group_id, f"learner:{config.policy}",
            start_at=self.progress.start_offset,
        )  # fmt: skip

    @property
    def group_id(self) -> str:
        return f"{self.settings.topic_prefix}recloop-learner-{self.config.policy}"

    def _resume(self) -> None:
        """Start from the latest snapshot: the agent's tensors, offsets and id window. Its
        offsets win over the group's committed ones (they agree but after a crash between
        snapshot and commit, and the snapshot is the truth)."""
        found = self.snapshots.latest(self.config.policy)
        if found is None:
            return
        tensors, manifest = found
        ids = publishing.unpack_ids(tensors.pop(publishing.APPLIED_IDS_KEY, np.zeros(0, np.uint8)))
        self.agent.load_state_tensors(tensors)
        self.progress = publishing.progress_from_manifest(manifest)
        self.window = publishing.DedupeWindow(self.config.dedupe_window, ids)
        log.info("resumed %s from v%d (%d applied)", self.config.policy, self.progress.version,
                 self.progress.transitions_applied)  # fmt: skip

    @property
    def state(self) -> publishing.Progress:
        return self.progress

    # -- loop ------------------------------------------------------------------------------

    def step(self, timeout: float | None = None) -> int:
        """Poll once, learn from what is new, publish if due; returns transitions applied."""
        wait = self.config.poll_timeout_s if timeout is None else timeout
        batch = self.reader.poll_batch(self.config.poll_max, wait)
        fresh: list[Transition] = []
        for consumed in batch:
            if self.lag is not None:
                self.lag.seen(consumed.partition, consumed.timestamp_ms)
            self.progress.consumed(consumed.topic, consumed.partition, consumed.offset)
            transition: Transition = consumed.value  # type: ignore[assignment]
            if self.window.fresh([transition.transition_id])[0]:
                fresh.append(transition)
            else:
                self.progress.duplicates_dropped += 1
                metrics.DUPLICATES_DROPPED.labels(self.config.policy).inc()
        if fresh:
            result = self.agent.learn_many(fresh)
            self.metrics = result.as_dict() if result is not None else {}
            self.progress.applied([t.transition_id for t in fresh],
                                  max(t.outcome_ts for t in fresh))  # fmt: skip
            self.unpublished += len(fresh)
            metrics.TRANSITIONS_APPLIED.labels(self.config.policy).inc(len(fresh))
        if self.schedule.due(self.unpublished, time.monotonic() - self.last_publish):
            self.publish()
        return len(fresh)

    def run(self, should_stop: Callable[[], bool], max_seconds: float | None = None) -> None:
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not should_stop() and (deadline is None or time.monotonic() < deadline):
                self.step()
            if self.unpublished:
                self.publish()
        finally:
            self.close()

    def publish(self) -> PolicyPublished:
        """Write, record and announce a snapshot, then commit the offsets it covers."""
        version = self.progress.version + 1
        manifest = publishing.compose_manifest(
            self.config.algo, self.agent.config_dict(), self.spec.to_dict(), self.metrics,
            self.progress, self.config.seed,
        )  # fmt: skip
        announcement = self.snapshots.write(self.config.policy, version, self.agent,
                                            list(self.window.ids), manifest)  # fmt: skip
        self.bus.publish(self.topics.snapshots, self.config.policy.encode(),
                         codec.encode(announcement))  # fmt: skip
        self.bus.flush()
        self.reader.commit()
        self.progress.version = version
        metrics.SNAPSHOT_VERSION.labels("learner", self.config.policy).set(version)
        metrics.SNAPSHOT_CREATED.labels("learner", self.config.policy).set(announcement.created_ts)
        self.unpublished = 0
        self.last_publish = time.monotonic()
        if self.on_publish:
            self.on_publish(getattr(self.snapshots, "last_ref", None) or announcement)
        return announcement

    def close(self) -> None:
        if self.lag is not None:
            self.lag.close()
        self.reader.close()
        self.bus.flush(10)
