"""The online learner service: transitions in, versioned snapshots out, over a ``Bus``.

Loop (``step``): poll a batch of ``rec.transitions`` (dead-lettering what does not decode),
drop transitions already applied (by id, ``learner.publishing.DedupeWindow``), feed the rest
to the agent's ``learn_many`` (the agent owns its update schedule), and when the
``PublishSchedule`` says so publish a snapshot:

1. ``weights.safetensors`` + ``manifest.json`` written atomically (``DiskSnapshots``), with
   the consumed offsets, the applied-transition count and digest, and the ids applied
   recently; recorded in storage. Its version is taken the moment it is written, and
   ``DiskSnapshots`` never hands out a version known anywhere already;
2. announced on ``policy.snapshots``;
3. only then are the offsets committed.

An announcement the bus does not acknowledge stays pending: the error goes to the caller,
and the next ``step`` or ``publish`` sends it again before anything else (serving takes a
repeated announcement as stale), so a snapshot written during an outage is announced once
the broker is back and its offsets are committed only after that. ``run`` waits such
transient bus errors out with a bounded backoff, saying "waiting for the broker" in the log
and in ``recloop_waiting_for_broker{process="learner"}``; a fatal error still ends it.

After a crash the service resumes from the newest snapshot that verifies (``DiskSnapshots``
refuses damaged ones and falls back): its tensors restore the agent exactly, its offsets say
where to read from, and its id window drops anything re-delivered between the snapshot and
the last commit. So no transition is lost or applied twice, and the manifest carries the
evidence (``transitions_applied`` and ``applied_digest``). The snapshot it resumed from is
announced again, in case a crash or an outage kept the first announcement from serving.

The catalogue and the sizes (``WorldSpec``) come from the stream, not from a simulator preset:

- The service follows the catalogue (``recloop.kafka.catalogue.CatalogueFollower``). Unless
  its caller gives one (or gives sizes with no item features, F = 0) it waits for the first
  complete version, at most ``Settings.catalogue_wait_s`` (then ``NoCatalogue``, whose
  message says what to start): an agent never trains on zero feature rows.
  Every newer version reaches the agent through ``set_catalogue`` before the next batch.
- ``n_items`` and ``item_feature_dim`` are the catalogue's; ``user_obs_dim``, ``slate_size``
  and ``num_candidates`` are read off the first transitions (``spec_from``), so the agent is
  built with the first batch. Resuming, they are the snapshot manifest's ``spec``: the
  sizes its tensors were trained with.
- A transition naming an item outside the catalogue (or outside the agent's tables, should
  the catalogue outgrow them) is dead-lettered with the reason (``learner.batch.refusal``).

A caller may give the sizes (``spec``, or an ``agent``) and the catalogue itself (the
in-process loop, tests); newer versions on the bus still reach the agent.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recloop import metrics
from recloop.core import codec
from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import PolicyPublished, Transition
from recloop.core.membus import DeliveryFailed
from recloop.core.ports import Bus
from recloop.core.settings import Settings
from recloop.core.spec import WorldSpec
from recloop.kafka.catalogue import CatalogueFollower, NoCatalogue
from recloop.kafka.deadletter import Reader, fatal
from recloop.learner import batch as learner_batch
from recloop.learner import publishing, registry
from recloop.learner.publishing import id_digest
from recloop.services.learn_snapshots import DiskSnapshots, Resumed, Snapshots

__all__ = ["DiskSnapshots", "LearnConfig", "LearnerService", "NoCatalogue", "Resumed", "Snapshots",
           "id_digest", "spec_from"]

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
    retry_first_s: float = 0.5
    """After a transient bus error ``run`` waits this long before trying again..."""
    retry_max_s: float = 10.0
    """...doubling the wait after each further error up to this."""
    history_len: int = 5
    """H, the recent positive items an agent's state reads (the learner's choice, not the
    world's; used where the service builds the agent's sizes itself)."""


def spec_from(catalogue: ItemCatalogue, transitions: Sequence[Transition],
              history_len: int = 5) -> WorldSpec:  # fmt: skip
    """The sizes of an agent for ``catalogue`` and the stream ``transitions`` come from: the
    catalogue's item count and width; the observation's length, the slate size K and the
    candidates per request N (0: the whole catalogue) as the longest of them in the batch."""
    if not transitions:
        raise ValueError("the sizes are read off at least one transition")
    return WorldSpec(
        n_items=catalogue.n_items,
        user_obs_dim=max(len(t.state.observation) for t in transitions),
        item_feature_dim=catalogue.feature_dim,
        slate_size=max(len(t.slate) for t in transitions),
        num_candidates=max(len(t.candidates) for t in transitions),
        history_len=history_len,
    )


class LearnerService:
    """One learner: owns the agent, its reader of ``rec.transitions``, its copy of the
    catalogue and the schedule.

    ``on_publish`` is called with each announcement once the bus has acknowledged it;
    ``stop`` ends the wait for the first catalogue early (``NoCatalogue``). ``agent`` and
    ``spec`` stay None until the sizes are known (module docstring).
    """

    def __init__(
        self,
        settings: Settings,
        config: LearnConfig,
        spec: WorldSpec | None = None,
        storage: Any = None,
        on_publish: Callable[[PolicyPublished], None] | None = None,
        *,
        bus: Bus | None = None,
        snapshots: Snapshots | None = None,
        agent: Any = None,
        catalogue: ItemCatalogue | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.settings, self.config, self.on_publish = settings, config, on_publish
        self.spec: WorldSpec | None = spec if spec is not None else getattr(agent, "spec", None)
        self.topics = settings.topics
        self.snapshots = snapshots or DiskSnapshots(
            settings.resolved_snapshot_dir, storage, key=settings.snapshot_key,
            max_weights_bytes=settings.snapshot_max_weights_bytes,
        )  # fmt: skip
        self.lag = None
        kafka = bus is None
        if bus is None:
            from recloop.kafka.bus import KafkaBus

            bus = KafkaBus(settings, process="learner")
        self.bus = bus
        self.follower = CatalogueFollower(bus, self.topics, f"learner-{config.policy}")
        self.catalogue: ItemCatalogue | None = catalogue or getattr(agent, "catalogue", None)
        if self.catalogue is None and (self.spec is None or self.spec.item_feature_dim):
            try:
                self.catalogue = self.follower.wait(settings.catalogue_wait_s, stop)
            except NoCatalogue:
                self.follower.close()
                raise
        self.agent = agent
        if agent is None and self.spec is not None:
            self.agent = self._make_agent(self.spec)
        elif agent is not None and self.catalogue is not None and agent.catalogue is None:
            agent.set_catalogue(self.catalogue)  # a caller's agent, built before the catalogue
        self.progress = publishing.Progress()
        self.window = publishing.DedupeWindow(config.dedupe_window)
        self.schedule = publishing.PublishSchedule(config.snapshot_every_transitions,
                                                   config.snapshot_every_s)  # fmt: skip
        self.metrics: dict[str, float] = {}
        self.last_publish = time.monotonic()
        self.unpublished = 0
        self.pending: PolicyPublished | None = None
        """The announcement of a written snapshot the bus has not acknowledged yet."""
        self.resumed = False
        self._resume()
        if kafka:
            from recloop.kafka.learner_lag import LagWatcher

            self.lag = LagWatcher(settings, self.group_id, config.policy, self.progress)
        self.reader = Reader(
            bus, self.topics, ["rec.transitions"], self.group_id, f"learner:{config.policy}",
            start_at=self._start_at,
        )  # fmt: skip

    def _make_agent(self, spec: WorldSpec) -> Any:
        if self.catalogue is not None and spec.item_feature_dim != self.catalogue.feature_dim:
            raise ValueError(
                f"{self.config.policy}: the agent's items have {spec.item_feature_dim} features, "
                f"catalogue v{self.catalogue.version} has {self.catalogue.feature_dim}"
            )
        return registry.make_agent(self.config.algo, spec, self.config.seed,
                                   catalogue=self.catalogue, **self.config.overrides)  # fmt: skip

    def _follow(self) -> None:
        """Take a newer catalogue version if the follower completed one (module docstring)."""
        new = self.follower.poll(0.0)
        if new is None or (self.catalogue is not None and new.version <= self.catalogue.version):
            return
        self.catalogue = new
        if self.agent is not None:
            self.agent.set_catalogue(new)

    def _bounds(self) -> WorldSpec | None:
        """The sizes a transition's ids are checked against: items the catalogue holds and,
        once the agent is built, that its tables hold too (a catalogue that grew past them
        names items this agent cannot learn)."""
        if self.catalogue is None:
            return self.spec
        if self.spec is None:
            return WorldSpec(n_items=self.catalogue.n_items, user_obs_dim=0,
                             item_feature_dim=self.catalogue.feature_dim, slate_size=1,
                             num_candidates=0)  # fmt: skip
        n_items = min(self.spec.n_items, self.catalogue.n_items)
        return dataclasses.replace(self.spec, n_items=n_items)

    @property
    def group_id(self) -> str:
        return f"{self.settings.topic_prefix}recloop-learner-{self.config.policy}"

    def _resume(self) -> None:
        """Start from the latest snapshot: the agent's tensors, offsets and id window. Its
        offsets win over the group's committed ones (they agree but after a crash between
        snapshot and commit, and the snapshot is the truth)."""
        resumed = self.snapshots.latest(self.config.policy)
        if resumed is None:
            return
        if self.agent is None:
            self.spec = WorldSpec.from_dict(resumed.manifest["spec"])
            self.agent = self._make_agent(self.spec)
        tensors = dict(resumed.tensors)
        ids = publishing.unpack_ids(tensors.pop(publishing.APPLIED_IDS_KEY, np.zeros(0, np.uint8)))
        self.agent.load_state_tensors(tensors)
        self.progress = publishing.progress_from_manifest(resumed.manifest)
        self.window = publishing.DedupeWindow(self.config.dedupe_window, ids)
        self.pending = resumed.announcement
        self.resumed = True
        log.info("resumed %s from v%d (%d applied)", self.config.policy, self.progress.version,
                 self.progress.transitions_applied)  # fmt: skip

    def _start_at(self, topic: str, partition: int) -> int | None:
        """Where to read a partition from: the resumed snapshot's offset, or the start of a
        partition it read nothing of (the group may have committed past it for a newer
        snapshot that was refused); without a snapshot, the group's committed offset."""
        offset = self.progress.start_offset(topic, partition)
        return 0 if offset is None and self.resumed else offset

    @property
    def state(self) -> publishing.Progress:
        return self.progress

    # -- loop ------------------------------------------------------------------------------

    def step(self, timeout: float | None = None) -> int:
        """Announce what is pending, poll once, learn from what is new, publish if due;
        returns transitions applied."""
        self._settle()
        self._follow()
        wait = self.config.poll_timeout_s if timeout is None else timeout
        batch = self.reader.poll_batch(self.config.poll_max, wait)
        bounds = self._bounds()
        fresh: list[Transition] = []
        for consumed in batch:
            if self.lag is not None:
                self.lag.seen(consumed.partition, consumed.timestamp_ms)
            self.progress.consumed(consumed.topic, consumed.partition, consumed.offset)
            transition: Transition = consumed.value  # type: ignore[assignment]
            problem = None if bounds is None else learner_batch.refusal(transition, bounds)
            if problem is not None:  # an item outside the catalogue: not learnable
                self.reader.dead_letter(consumed, f"unlearnable transition: {problem}")
                continue
            if self.window.fresh([transition.transition_id])[0]:
                fresh.append(transition)
            else:
                self.progress.duplicates_dropped += 1
                metrics.DUPLICATES_DROPPED.labels(self.config.policy).inc()
        if fresh and self.agent is None:
            assert self.catalogue is not None  # no sizes without a catalogue (constructor)
            self.spec = spec_from(self.catalogue, fresh, self.config.history_len)
            self.agent = self._make_agent(self.spec)
            log.info("%s: %s built for %s", self.config.policy, self.config.algo, self.spec)
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
        """Step until ``should_stop()`` (or ``max_seconds``), waiting out transient bus errors
        with a doubling backoff; publish what is left, then close."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds

        def going() -> bool:
            return not should_stop() and (deadline is None or time.monotonic() < deadline)

        pause = 0.0
        try:
            while going():
                try:
                    self.step()
                except Exception as exc:
                    if not transient(exc):
                        raise
                    pause = min(max(2 * pause, self.config.retry_first_s), self.config.retry_max_s)
                    self._wait_for_broker(exc, pause, going)
                    continue
                if pause:
                    pause = 0.0
                    metrics.WAITING_FOR_BROKER.labels("learner").set(0)
                    log.info("learner %s: the broker is back", self.config.policy)
            self._last_publish()
        finally:
            metrics.WAITING_FOR_BROKER.labels("learner").set(0)
            self.close()

    def _wait_for_broker(self, exc: Exception, pause: float, going: Callable[[], bool]) -> None:
        metrics.WAITING_FOR_BROKER.labels("learner").set(1)
        log.warning("learner %s: waiting for the broker (%s: %s); trying again in %.1f s",
                    self.config.policy, type(exc).__name__, exc, pause)  # fmt: skip
        until = time.monotonic() + pause
        while going() and time.monotonic() < until:
            time.sleep(min(0.1, pause))

    def _last_publish(self) -> None:
        # Stopping while the broker is away: the snapshot is written, and the next start
        # announces the snapshot it resumes from.
        try:
            if self.unpublished:
                self.publish()
            self._settle()
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("learner %s: stopping with v%d not announced (%s); the next start "
                        "announces it", self.config.policy, self.progress.version, exc)  # fmt: skip

    def publish(self) -> PolicyPublished:
        """Write and record a snapshot, announce it, then commit the offsets it covers.

        A pending announcement is settled first. The new snapshot's version is taken as soon
        as it is written; if its announcement is not acknowledged the error is raised and
        the announcement stays pending (see the module docstring).
        """
        self._settle()
        if self.agent is None or self.spec is None:
            raise RuntimeError(f"{self.config.policy}: no agent to publish before its first "
                               f"transition (its sizes come from the stream)")  # fmt: skip
        manifest = publishing.compose_manifest(
            self.config.algo, self.agent.config_dict(), self.spec.to_dict(), self.metrics,
            self.progress, self.config.seed,
        )  # fmt: skip
        if self.catalogue is not None:
            manifest["catalogue"] = {"version": self.catalogue.version,
                                     "n_items": self.catalogue.n_items,
                                     "sha256": self.catalogue.sha256}  # fmt: skip
        announcement = self.snapshots.write(self.config.policy, self.progress.version + 1,
                                            self.agent, list(self.window.ids),
                                            manifest)  # fmt: skip
        self.progress.version = announcement.version
        metrics.SNAPSHOT_VERSION.labels("learner", self.config.policy).set(announcement.version)
        metrics.SNAPSHOT_CREATED.labels("learner", self.config.policy).set(announcement.created_ts)
        self.unpublished = 0
        self.last_publish = time.monotonic()
        self.pending = announcement
        self._settle()
        return announcement

    def _settle(self) -> None:
        """Send the pending announcement and wait for the bus to acknowledge it; only then
        commit the offsets its snapshot covers. Raises (leaving it pending) if not acked."""
        announcement = self.pending
        if announcement is None:
            return
        self.bus.publish(self.topics.snapshots, self.config.policy.encode(),
                         codec.encode(announcement))  # fmt: skip
        self.bus.flush()
        self.pending = None
        if self.on_publish:
            self.on_publish(announcement)
        self.reader.commit()

    def close(self) -> None:
        if self.lag is not None:
            self.lag.close()
        try:
            self.follower.close()
            self.reader.close()
            self.bus.flush(10)
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("learner %s: closed with records unacknowledged: %s",
                        self.config.policy, exc)  # fmt: skip


def transient(exc: Exception) -> bool:
    """Whether a bus error is broker trouble to wait out: a delivery that was not
    acknowledged, or a Kafka error that is not fatal (anything else is a bug, and raises)."""
    from recloop.kafka.clients import DeliveryError  # confluent-kafka only once it matters

    return isinstance(exc, (DeliveryError, DeliveryFailed)) or not fatal(exc)
