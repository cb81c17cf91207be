"""``recloop sim``: simulated users that talk to serving over a ``Bus`` (Kafka or in memory).

Each of ``users`` concurrent users publishes a RecRequest to ``rec.requests`` (keyed by
user), waits for the SlateServed with that request id on ``rec.slates``, reacts (producer_sim
decides what it clicks) and publishes its Impressions, Click and SessionEnd to
``rec.feedback`` and, when its session ends, the ground-truth EpisodeOutcome to
``sim.outcomes``; a fresh user then takes its place. The events are built by
``producer_sim.cohort``, the same code the in-process runner uses.

Requests name their candidates by id only. Before its first request the service publishes
its world's catalogue (``World.item_catalogue``, version 1) on ``items`` and ``catalogue``
(``recloop.kafka.catalogue.publish_catalogue``), so serving and the learner can look every
candidate's features up; a restarted simulator publishes the same version again (same
sha256, so a follower that has it changes nothing). A world that resamples its documents
(``World.resample_every``) makes a new version between rounds of requests: its new chunks
(``first=`` the first new id) and announcement are acknowledged before the round's
requests go out (a restarted simulator starts over from version 1, which followers already
past it ignore: resampling runs want a fresh topic prefix per run).

Failure handling:
- a slate that does not decode, or decodes but cannot be shown (wrong size, repeated items,
  items outside the candidates), is dead-lettered by the ``Reader``, which holds back the
  next commit until the dead letter is acknowledged; the user keeps waiting for a good
  answer;
- a request without a slate within ``slate_timeout_s`` is counted and sent again with the
  same request id (so a late first answer still counts); no slate is ever made up;
- slates for requests nobody here is waiting on (another run, a late duplicate) are counted
  and ignored;
- a broker outage is waited out: deliveries wait in librdkafka's queue
  (``kafka.clients``), and a commit that fails for a transient reason is counted and
  retried at the next one.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from recloop import metrics
from recloop.core import codec
from recloop.core.events import Click, Record, SlateServed
from recloop.core.ports import Bus
from recloop.core.settings import Settings
from recloop.kafka.catalogue import publish_catalogue
from recloop.kafka.deadletter import Consumed, Reader, fatal
from recloop.producer_sim.cohort import Cohort, InvalidSlate
from recloop.producer_sim.presets import make_world
from recloop.producer_sim.world import World
from recloop.services.sim_settings import SimConfig, SimStats

__all__ = ["CONSUMER_NAME", "PRODUCER_TUNING", "SimConfig", "SimService", "SimStats"]

log = logging.getLogger(__name__)

CONSUMER_NAME = "producer_sim"

# Batching: a few ms of linger lets librdkafka pack hundreds of small events per request.
PRODUCER_TUNING = {
    "linger.ms": 10,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 1000000,
}


class SimService:
    """The bus shell around ``producer_sim.cohort.Cohort``: ``step`` is one round."""

    def __init__(
        self, settings: Settings, config: SimConfig, producer: Any = None, *,
        bus: Bus | None = None, world: World | None = None,
    ) -> None:  # fmt: skip
        self.settings, self.config, self.topics = settings, config, settings.topics
        self.world = world or make_world(config.preset, seed=config.seed, **config.preset_options)
        run_tag = config.run_tag or f"sim{config.seed}-{uuid.uuid4().hex[:6]}"
        self.cohort = Cohort(self.world, config.users, config.seed, run_tag)
        self.stats = SimStats()
        self.gauges = metrics.OutcomeGauges()
        if bus is None:
            from recloop.kafka.bus import KafkaBus

            bus = KafkaBus(settings, PRODUCER_TUNING, producer, process="sim")
        self.bus = bus
        # A fresh group per run that starts at the current end of rec.slates: it reads every
        # answer to this run's requests and none of the backlog of earlier runs.
        self._reader: Reader | None = Reader(
            bus, self.topics, ["rec.slates"], self.topics.group(f"recloop-sim-{run_tag}"), CONSUMER_NAME,
            from_end=True, tuning={"fetch.wait.max.ms": 10},
        )  # fmt: skip
        self._waiting: dict[str, int] = {}  # request id -> slot
        self._sent_at = np.zeros(config.users)
        self._ready: deque[int] = deque()  # slots with a new request to send (rate limit)
        self._tokens = 0.0
        self._last_refill = self._last_commit = time.monotonic()
        self.started = False

    # -- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        """The catalogue published, fresh stats and the first users (after the reader owns
        its partitions)."""
        cfg = self.config
        publish_catalogue(self.bus, self.topics, self.cohort.sim.item_catalogue)
        self._wait_for_assignment()
        self.stats = SimStats()
        self._start_users(np.arange(min(cfg.users, cfg.max_sessions or cfg.users)))
        self.started = True

    def step(self, timeout: float = 0.0) -> bool:
        """One round: send what is ready, handle the slates that came, resend the overdue,
        commit once a second. Returns False once a limit of the config is reached."""
        if not self.started:
            self.start()
        if self.done():
            return False
        assert self._reader is not None
        self._send_ready()
        self.bus.serve()
        batch = self._reader.poll_batch(max_records=5000, timeout=timeout)
        if batch:
            self._handle_slates(batch)
        now = time.monotonic()
        self._resend_overdue(now)
        self.bus.serve()
        if now - self._last_commit > 1.0:
            self._commit()
            self._last_commit = now
        return not self.done()

    def run(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[SimStats], None] | None = None,
        progress_every_s: float = 0.5,
    ) -> SimStats:
        """Simulate until a limit in the config is reached or ``should_stop()`` is true.

        A service runs once: it flushes, commits and closes its clients before returning.
        """
        try:
            self.start()
            last_progress = time.monotonic()
            while not should_stop() and self.step(timeout=0.02):
                if on_progress and time.monotonic() - last_progress >= progress_every_s:
                    on_progress(self.stats)
                    last_progress = time.monotonic()
        finally:
            self.close()
        if on_progress:
            on_progress(self.stats)
        return self.stats

    def _commit(self) -> None:
        """Commit the slates read; a transient failure (the broker or its coordinator away)
        is counted and retried at the next commit: the positions are kept (``Reader``)."""
        assert self._reader is not None
        try:
            self._reader.commit()
        except Exception as exc:
            if fatal(exc):
                raise
            self.stats.commit_errors += 1
            self.stats.last_error = str(exc)
            log.warning("sim: commit failed, retrying at the next one: %s", exc)

    def close(self) -> None:
        """Flush what was published and commit; safe to call twice."""
        if self._reader is None:
            return
        try:
            self.bus.flush()
            self._reader.commit()
        finally:
            self._reader.close()
            self._reader = None

    @property
    def reader(self) -> Reader:
        assert self._reader is not None, "the service is closed"
        return self._reader

    @property
    def outbox_totals(self) -> Any:
        return self.bus.outbox.totals  # type: ignore[attr-defined]

    def done(self) -> bool:
        cfg, s = self.config, self.stats
        if cfg.max_events and s.published >= cfg.max_events:
            return True
        if cfg.duration_s and (s.served_s >= cfg.duration_s or (
                s.first_slate_s is None and s.elapsed_s >= cfg.startup_timeout_s)):
            return True
        # With a session cap, or once every user is gone, the run is over.
        return not self.cohort.sim.pop.active_U.any()

    def _wait_for_assignment(self, timeout_s: float = 60.0) -> None:
        """Block until this run's reader owns rec.slates' partitions (a rebalance later would
        only delay answers: the group's offsets were set before the first request)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.reader.consumer.assigned():
                return
            self.reader.poll_batch(max_records=100, timeout=0.1)
        raise TimeoutError(
            f"no partition of {self.topics.slates} assigned within {timeout_s:.0f} s"
        )

    # -- requests ------------------------------------------------------------------------------

    def _start_users(self, slots: np.ndarray) -> None:
        if slots.size:
            self.cohort.start(slots)
            self.stats.sessions_started += int(slots.size)
            self._ready.extend(slots.tolist())

    def _send_ready(self) -> None:
        n = len(self._ready)
        if n and self.config.rate > 0:
            now = time.monotonic()
            # Token bucket: at most one second's worth of burst.
            self._tokens = min(self._tokens + (now - self._last_refill) * self.config.rate,
                               self.config.rate)  # fmt: skip
            self._last_refill = now
            n = min(n, int(self._tokens))
            self._tokens -= n
        if n == 0:
            return
        slots = np.array([self._ready.popleft() for _ in range(n)], dtype=np.int64)
        known = self.cohort.sim.catalogue.n_items
        new = self.cohort.refresh_documents()
        if new is not None:
            publish_catalogue(self.bus, self.topics, new, first=known)
            self.stats.catalogue_versions += 1
        requests = self.cohort.request(slots, time.time())
        now = time.monotonic()
        for slot, req in zip(slots.tolist(), requests, strict=True):
            self._waiting[req.request_id] = slot
            self._sent_at[slot] = now
            self._publish(self.topics.requests, req)
        self.stats.requests += n

    def _resend_overdue(self, now: float) -> None:
        timeout = self.config.slate_timeout_s
        if timeout <= 0:
            return
        overdue = np.flatnonzero((now - self._sent_at > timeout) & self.cohort.sim.pop.active_U)
        for slot in overdue.tolist():
            req = self.cohort.pending[slot]
            if req is None or req.request_id not in self._waiting:
                continue  # queued behind the rate limit, not yet sent
            self._publish(self.topics.requests, req)
            self._sent_at[slot] = now
            self.stats.retries += 1

    # -- slates and feedback -------------------------------------------------------------------

    def _handle_slates(self, batch: list[Consumed]) -> None:
        slots, items, policies = [], [], []
        answered: set[int] = set()
        for msg in batch:
            served: SlateServed = msg.value  # type: ignore[assignment]
            slot = self._waiting.get(served.request_id)
            if slot is None or self.cohort.user_ids[slot] != served.user_id or slot in answered:
                self.stats.unmatched_slates += 1
                continue
            try:
                items.append(self.cohort.check_slate(slot, served.items))
            except InvalidSlate as exc:
                self.reader.dead_letter(msg, str(exc))
                self.stats.invalid_slates += 1
                continue
            del self._waiting[served.request_id]
            slots.append(slot)
            answered.add(slot)
            policies.append((served.policy, served.policy_version))
        self.stats.undecodable_slates = self.reader.stats.dead_lettered - self.stats.invalid_slates
        if not slots:
            return
        slots_U = np.array(slots, dtype=np.int64)
        answer = self.cohort.answer(slots_U, np.array(items, dtype=np.int64), policies, time.time())
        if self.stats.first_slate_s is None:
            self.stats.first_slate_s = time.monotonic()
        self.stats.slates += len(slots)
        for records in answer.feedback:
            for record in records:
                self._publish(self.topics.feedback, record)
            self.stats.feedback += len(records)
            self.stats.clicks += sum(isinstance(r, Click) for r in records)
        for outcome in answer.outcomes:
            self._publish(self.topics.outcomes, outcome)
            self.stats.record_outcome(outcome, self.config.keep_outcomes)
            self.gauges.export(outcome)
        going_on = slots_U[~np.isin(slots_U, answer.finished_slots)]
        self._ready.extend(going_on.tolist())
        self._refill(answer.finished_slots)

    def _refill(self, finished: np.ndarray) -> None:
        cap = self.config.max_sessions
        room = (
            finished.size
            if not cap
            else max(0, min(finished.size, cap - self.stats.sessions_started))
        )
        self._start_users(finished[:room])

    def _publish(self, topic: str, record: Record) -> None:
        user_id: str = record.user_id  # type: ignore[attr-defined]  # every record the sim sends
        self.bus.publish(topic, user_id.encode(), codec.encode(record))
