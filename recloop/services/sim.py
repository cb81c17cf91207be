"""``recloop sim``: simulated users that talk to serving through Kafka.

Each of ``users`` concurrent users publishes a RecRequest to ``rec.requests`` (keyed by
user), waits for the SlateServed with that request id on ``rec.slates``, reacts (producer_sim
decides what it clicks) and publishes its Impressions, Click and SessionEnd to
``rec.feedback`` and, when its session ends, the ground-truth EpisodeOutcome to
``sim.outcomes``; a fresh user then takes its place. The events are built by
``producer_sim.cohort``, the same code the in-process runner uses.

Failure handling:
- a slate that does not decode is dead-lettered by ``DeadLetterConsumer``; one that decodes
  but cannot be shown (wrong size, repeated items, items outside the candidates) is
  dead-lettered here with the same headers; the user keeps waiting for a good answer;
- a request without a slate within ``slate_timeout_s`` is counted and sent again with the
  same request id (so a late first answer still counts); no slate is ever made up;
- slates for requests nobody here is waiting on (another run, a late duplicate) are counted
  and ignored.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from recloop import metrics
from recloop.core import codec
from recloop.core.dlq import dlq_headers
from recloop.core.events import Click, EpisodeOutcome, Record, SlateAnswer
from recloop.core.settings import Settings
from recloop.kafka.clients import DeliveryTracker, flush_or_raise, make_consumer, make_producer
from recloop.kafka.dlq import Consumed, DeadLetterConsumer
from recloop.producer_sim.cohort import Cohort, InvalidSlate
from recloop.producer_sim.presets import make_world

CONSUMER_NAME = "producer_sim"

# Batching: a few ms of linger lets librdkafka pack hundreds of small events per request.
PRODUCER_TUNING = {
    "linger.ms": 10,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 1000000,
}


@dataclass(frozen=True)
class SimConfig:
    """What to simulate and when to stop (0 means no limit)."""

    preset: str = "interest_evolution"
    """World preset (see producer_sim.presets)."""
    preset_options: dict = field(default_factory=dict)
    """Options for the preset builder, e.g. {"slate_size": 3}."""
    users: int = 100
    """Concurrent simulated users."""
    seed: int = 0
    """Seeds the catalogue and the users' behaviour."""
    rate: float = 0.0
    """Most requests per second (0: as fast as slates come back)."""
    max_events: int = 0
    """Stop once this many events (requests, feedback, outcomes) are published; the last
    batch of answers is published whole, so the count may pass the limit by one batch."""
    max_sessions: int = 0
    """Start no more than this many sessions and stop when they have all ended."""
    duration_s: float = 0.0
    """Stop after this many seconds."""
    slate_timeout_s: float = 5.0
    """Resend a request that got no slate within this many seconds."""
    run_tag: str = ""
    """Prefix of user ids; default: sim<seed>-<random hex>, unique per run."""


@dataclass
class SimStats:
    """Running counts of one simulator run."""

    started_s: float = field(default_factory=time.monotonic)
    requests: int = 0
    retries: int = 0
    slates: int = 0
    invalid_slates: int = 0
    undecodable_slates: int = 0
    unmatched_slates: int = 0
    feedback: int = 0
    outcomes: int = 0
    clicks: int = 0
    sessions_started: int = 0
    recent_returns: deque = field(default_factory=lambda: deque(maxlen=200))
    returns_by_policy: dict[str, list[float]] = field(default_factory=dict)

    @property
    def published(self) -> int:
        return self.requests + self.retries + self.feedback + self.outcomes

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_s

    @property
    def ctr(self) -> float:
        return self.clicks / self.slates if self.slates else 0.0

    def record_outcome(self, outcome: EpisodeOutcome) -> None:
        self.outcomes += 1
        self.recent_returns.append(outcome.total_return)
        # Attribute the session to the policy version that served most of its slates.
        if outcome.policy_steps:
            key = max(outcome.policy_steps, key=outcome.policy_steps.__getitem__)
            self.returns_by_policy.setdefault(key, []).append(outcome.total_return)


class SimService:
    """The Kafka shell around ``producer_sim.cohort.Cohort``."""

    def __init__(
        self, settings: Settings, config: SimConfig, producer: Producer | None = None
    ) -> None:
        self.settings = settings
        self.config = config
        self.topics = settings.topics
        self.world = make_world(config.preset, seed=config.seed, **config.preset_options)
        run_tag = config.run_tag or f"sim{config.seed}-{uuid.uuid4().hex[:6]}"
        self.cohort = Cohort(self.world, config.users, config.seed, run_tag)
        self.stats = SimStats()
        self._producer = producer or make_producer(settings, PRODUCER_TUNING)
        self._deliveries = DeliveryTracker()
        self._outbox = Outbox(self._producer, self._deliveries)
        self._requests_topic = self.topics.requests
        group_id = f"recloop-sim-{run_tag}"
        # A fresh group per run that starts at the current end of rec.slates: it reads every
        # answer to this run's requests and none of the backlog of earlier runs.
        commit_group_at_end(settings, self.topics.slates, group_id)
        self._consumer = DeadLetterConsumer(
            settings,
            ["rec.slates"],
            group_id=group_id,
            name=CONSUMER_NAME,
            # Only what the user acts on: the echoed candidate features are for learning.
            value_types={self.topics.slates: SlateAnswer},
            consumer_config={"fetch.wait.max.ms": 10},
            producer=self._producer,
        )
        self._waiting: dict[str, int] = {}  # request id -> slot
        self._sent_at = np.zeros(config.users)
        self._ready: deque[int] = deque()  # slots with a new request to send (rate limit)
        self._tokens = 0.0
        self._last_refill = time.monotonic()

    # -- the loop ------------------------------------------------------------------------------

    def run(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[SimStats], None] | None = None,
        progress_every_s: float = 0.5,
    ) -> SimStats:
        """Simulate until a limit in the config is reached or ``should_stop()`` is true.

        A service runs once: it flushes, commits and closes its clients before returning.
        """
        cfg = self.config
        try:
            self._wait_for_assignment()
            self.stats = SimStats()
            self._start_users(np.arange(min(cfg.users, cfg.max_sessions or cfg.users)))
            last_progress = last_commit = time.monotonic()
            while not should_stop() and not self._limit_reached():
                self._send_ready()
                batch = self._consumer.poll_batch(max_records=5000, timeout=0.02)
                if batch:
                    self._handle_slates(batch)
                now = time.monotonic()
                self._resend_overdue(now)
                self._producer.poll(0)
                self._deliveries.raise_if_failed()
                if now - last_commit > 1.0:
                    self._consumer.commit()
                    last_commit = now
                if on_progress and now - last_progress >= progress_every_s:
                    on_progress(self.stats)
                    last_progress = now
        finally:
            self.close()
        if on_progress:
            on_progress(self.stats)
        return self.stats

    def close(self) -> None:
        """Flush what was published and commit; safe to call twice."""
        if self._consumer is None:
            return
        try:
            flush_or_raise(self._producer, self._deliveries)
            self._consumer.commit()
        finally:
            self._consumer.close()
            self._consumer = None

    @property
    def outbox_totals(self) -> OutboxTotals:
        return self._outbox.totals

    def _limit_reached(self) -> bool:
        cfg, s = self.config, self.stats
        if cfg.max_events and s.published >= cfg.max_events:
            return True
        if cfg.duration_s and s.elapsed_s >= cfg.duration_s:
            return True
        # With a session cap, or once every user is gone, the run is over.
        return not self.cohort.sim.pop.active_U.any()

    def _wait_for_assignment(self, timeout_s: float = 60.0) -> None:
        """Block until this run's consumer owns rec.slates' partitions (a rebalance later would
        only delay answers: the group's offsets were set before the first request)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._consumer.poll_batch(max_records=100, timeout=0.1)
            if self._consumer.consumer.assignment():
                return
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
        if not self._ready:
            return
        n = len(self._ready)
        if self.config.rate > 0:
            now = time.monotonic()
            # Token bucket: at most one second's worth of burst.
            self._tokens = min(
                self._tokens + (now - self._last_refill) * self.config.rate, self.config.rate
            )
            self._last_refill = now
            n = min(n, int(self._tokens))
            self._tokens -= n
        if n == 0:
            return
        slots = np.array([self._ready.popleft() for _ in range(n)], dtype=np.int64)
        requests = self.cohort.request(slots, time.time())
        now = time.monotonic()
        for slot, req in zip(slots.tolist(), requests, strict=True):
            self._waiting[req.request_id] = slot
            self._sent_at[slot] = now
            self._publish(self._requests_topic, req)
        self._outbox.send()
        self.stats.requests += n

    def _resend_overdue(self, now: float) -> None:
        timeout = self.config.slate_timeout_s
        overdue = np.flatnonzero((now - self._sent_at > timeout) & self.cohort.sim.pop.active_U)
        for slot in overdue.tolist():
            req = self.cohort.pending[slot]
            if req is None or req.request_id not in self._waiting:
                continue  # queued behind the rate limit, not yet sent
            self._publish(self._requests_topic, req)
            self._sent_at[slot] = now
            self.stats.retries += 1
        self._outbox.send()

    # -- slates and feedback -------------------------------------------------------------------

    def _handle_slates(self, batch: list[Consumed]) -> None:
        slots, items, policies = [], [], []
        answered: set[int] = set()
        for msg in batch:
            served: SlateAnswer = msg.value
            slot = self._waiting.get(served.request_id)
            if slot is None or self.cohort.user_ids[slot] != served.user_id or slot in answered:
                self.stats.unmatched_slates += 1
                continue
            try:
                items.append(self.cohort.check_slate(slot, served.items))
            except InvalidSlate as exc:
                self._dead_letter(msg, str(exc))
                continue
            del self._waiting[served.request_id]
            slots.append(slot)
            answered.add(slot)
            policies.append((served.policy, served.policy_version))
        self.stats.undecodable_slates = self._consumer.stats.dead_lettered
        if not slots:
            return
        slots_U = np.array(slots, dtype=np.int64)
        answer = self.cohort.answer(slots_U, np.array(items, dtype=np.int64), policies, time.time())
        self.stats.slates += len(slots)
        feedback_topic = self.topics.feedback
        for records in answer.feedback:
            for record in records:
                self._publish(feedback_topic, record)
            self.stats.feedback += len(records)
        for outcome in answer.outcomes:
            self._publish(self.topics.outcomes, outcome)
            self.stats.record_outcome(outcome)
            _export_outcome(outcome)
        self._outbox.send()
        self.stats.clicks += sum(
            isinstance(r, Click) for records in answer.feedback for r in records
        )
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

    def _dead_letter(self, msg: Consumed, error: str) -> None:
        # The record decoded, so re-encoding it gives the same content as the original bytes.
        headers = dlq_headers(error, msg.topic, msg.partition, msg.offset, CONSUMER_NAME)
        self._produce(self.topics.dlq(msg.topic), msg.key, codec.encode(msg.value), headers)
        self.stats.invalid_slates += 1

    def _publish(self, topic: str, record: Record) -> None:
        """Queue ``record`` keyed by its user; ``_outbox.send()`` hands the batch to Kafka."""
        self._outbox.add(topic, record.user_id.encode(), codec.encode(record))

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._deliveries
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room, then retry.
                self._producer.poll(0.05)


@dataclass
class OutboxTotals:
    """Messages and value bytes queued so far."""

    messages: int = 0
    bytes: int = 0


class Outbox:
    """Messages queued per topic, handed to librdkafka with one ``produce_batch`` per topic.

    From Python that costs several times less per message than one ``produce()`` each, and
    partitions by key exactly as ``produce()`` does. Order within a topic is kept.
    """

    def __init__(self, producer: Producer, on_delivery: Callable) -> None:
        self._producer = producer
        self._on_delivery = on_delivery
        self._by_topic: dict[str, list[dict]] = {}
        self.totals = OutboxTotals()

    def add(self, topic: str, key: bytes | None, value: bytes) -> None:
        self._by_topic.setdefault(topic, []).append({"key": key, "value": value})
        self.totals.messages += 1
        self.totals.bytes += len(value)

    def send(self) -> None:
        for topic, messages in self._by_topic.items():
            metrics.RECORDS_OUT.labels("sim", topic).inc(len(messages))
            while messages:
                try:
                    queued = self._producer.produce_batch(
                        topic, messages, on_delivery=self._on_delivery
                    )
                except BufferError:
                    queued = 0  # nothing was queued: the local queue is full
                if queued == len(messages):
                    break
                # Failed messages carry "_error"; retry them, in order, once there is room.
                failed = [m for m in messages if "_error" in m] if queued else messages
                for m in failed:
                    err = m.pop("_error", None)
                    if err is not None and err.code() != KafkaError._QUEUE_FULL:
                        raise KafkaException(err)
                messages = failed
                self._producer.poll(0.05)
        self._by_topic = {}


def commit_group_at_end(
    settings: Settings, topic: str, group_id: str, timeout_s: float = 30.0
) -> None:
    """Commit ``group_id``'s offsets at the high watermark of every partition of ``topic``.

    Unlike auto.offset.reset=latest, which resolves "latest" only when fetching starts (after
    a rebalance that may outlast the first answers), this pins the start before anything is
    requested.
    """
    consumer = make_consumer(settings, group_id)
    try:
        deadline = time.monotonic() + timeout_s
        while (
            meta := consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        ).error is not None:
            # A topic created a moment ago may not be known to the broker's metadata yet.
            if meta.error.code() not in _NOT_READY or time.monotonic() > deadline:
                raise KafkaException(meta.error)
            time.sleep(0.2)
        offsets = [
            TopicPartition(topic, p, _high_watermark(consumer, topic, p, deadline))
            for p in sorted(meta.partitions)
        ]
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


_NOT_READY = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
}


def _high_watermark(consumer, topic: str, partition: int, deadline: float) -> int:
    # Likewise its partitions may not have a leader yet.
    while True:
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5.0)[1]
        except KafkaException as exc:
            if exc.args[0].code() not in _NOT_READY or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _export_outcome(outcome: EpisodeOutcome) -> None:
    """Prometheus: finished sessions and their ground truth per serving policy version.

    Gauges hold an exponential moving average (weight 0.05 per session), so a dashboard
    sees each version's return and CTR settle without a window of its own.
    """
    policy, version = "unknown", "0"
    if outcome.policy_steps:
        key = max(outcome.policy_steps, key=outcome.policy_steps.__getitem__)
        policy, _, version = key.rpartition(":")
    metrics.SIM_EPISODES.labels(policy, version).inc()
    ctr = outcome.clicks / outcome.steps if outcome.steps else 0.0
    for name, gauge, value in (
        ("return", metrics.SIM_RETURN, outcome.total_return),
        ("ctr", metrics.SIM_CTR, ctr),
    ):
        key = (name, policy, version)
        previous = _EMA.get(key)
        _EMA[key] = value if previous is None else previous + 0.05 * (value - previous)
        gauge.labels(policy, version).set(_EMA[key])


_EMA: dict[tuple[str, str, str], float] = {}
