"""Watch the live loop: return and CTR per policy version, lag, freshness, throughput.

``LoopMonitor`` reads what the loop already publishes (ground-truth ``sim.outcomes``,
``policy.snapshots`` announcements, served ``rec.slates``) plus consumer-group offsets, keeps
per-window aggregates, writes them to storage (``Outcome`` rows and ``Sample`` time series,
which ``recloop report`` plots) and renders a rich table. It is an observer: a record it
cannot decode is counted and skipped; the owning consumers dead-letter it.

An announcement goes through the checks serving makes before the monitor believes it
(``announced_version``): with a snapshot key its signature must verify; its hashes must be
the ones storage recorded for that version when there is a row; its path must be the
learner's name for it (``<policy>/v<version>``, so never absolute, never ``..``), and the
manifest read under the snapshot root (no symlinks, regular file, size cap) must have the
announced hash. A remote deployment may not share the snapshot directory: then an
authenticated or recorded announcement still counts (freshness unknown); anything else is
refused and counted in ``refused``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Consumer, TopicPartition
from rich.table import Table

from recloop.core import codec, snapshot_auth
from recloop.core.codec import RecordDecodeError
from recloop.core.events import EpisodeOutcome, PolicyPublished, SlateServed
from recloop.core.settings import Settings
from recloop.core.snapshot import (
    SnapshotError,
    check_announced_name,
    describe_snapshot,
    resolve_announcement,
)
from recloop.kafka import lag as kafka_lag
from recloop.storage.store import Outcome, Sample, Storage

Watched = EpisodeOutcome | PolicyPublished | SlateServed
"""The records the monitor reads: outcomes, announced snapshots and served slates."""


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass
class ArmWindow:
    """Aggregates for one (policy, version) in the current window."""

    episodes: int = 0
    return_sum: float = 0.0
    return_sq_sum: float = 0.0
    steps: int = 0
    clicks: int = 0
    quality_sum: float = 0.0

    def add(self, outcome: EpisodeOutcome) -> None:
        self.episodes += 1
        self.return_sum += outcome.total_return
        self.return_sq_sum += outcome.total_return**2
        self.steps += outcome.steps
        self.clicks += outcome.clicks
        self.quality_sum += outcome.clicked_quality_sum

    @property
    def mean_return(self) -> float:
        return self.return_sum / self.episodes

    @property
    def return_sd(self) -> float:
        """Sample standard deviation of the episodes' returns (0 for a single episode)."""
        if self.episodes < 2:
            return 0.0
        spread = self.return_sq_sum - self.episodes * self.mean_return**2
        return math.sqrt(max(0.0, spread) / (self.episodes - 1))

    def return_ci95(self) -> str:
        """``± half-width`` of the mean return's 95% interval, empty below two episodes."""
        if self.episodes < 2:
            return ""
        return f" ± {1.96 * self.return_sd / math.sqrt(self.episodes):.1f}"


@dataclass
class VersionInfo:
    created_ts: float
    newest_event_ts: float | None
    first_served_ts: float | None = None

    @property
    def freshness_s(self) -> float | None:
        """From the newest event the snapshot learned from to its first served slate."""
        if self.first_served_ts is None or self.newest_event_ts is None:
            return None
        return max(0.0, self.first_served_ts - self.newest_event_ts)


@dataclass
class MonitorView:
    """What the terminal shows; also the demo's final summary."""

    events_per_s: float = 0.0
    slates_per_s: float = 0.0
    learner_lag: int = 0
    learner_lag_s: float | None = None
    versions: dict[str, int] = field(default_factory=dict)
    freshness_s: dict[str, float] = field(default_factory=dict)
    totals: dict[str, ArmWindow] = field(default_factory=lambda: defaultdict(ArmWindow))


def announced_version(
    published: PolicyPublished, settings: Settings, recorded: dict | None
) -> VersionInfo:
    """What the monitor learns from ``published`` once it passes serving's checks (see the
    module docstring); ``recorded`` is storage's row of that version. Raises
    ``SnapshotError`` for an announcement that is refused."""
    authentic = snapshot_auth.verify(published, settings.snapshot_key)
    known = snapshot_auth.check_recorded(published, recorded)
    check_announced_name(published.policy, published.version, published.path)
    newest = None
    try:
        where = resolve_announcement(settings.resolved_snapshot_dir, published.policy,
                                     published.version, published.path)  # fmt: skip
        ref = describe_snapshot(where)
        if ref.manifest_sha256 != published.manifest_sha256:
            raise SnapshotError("the manifest's SHA-256 is not the announced one")
        if (ref.policy, ref.version) != (published.policy, published.version):
            raise SnapshotError("the manifest names another policy or version")
        service = ref.manifest.get("service")
        value = service.get("newest_event_ts") if isinstance(service, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and value:
            newest = float(value)
    except SnapshotError:
        if not (authentic or known):
            raise
    return VersionInfo(published.created_ts, newest)


def majority_arm(outcome: EpisodeOutcome) -> tuple[str, int]:
    """The (policy, version) that served most of an episode's slates."""
    if not outcome.policy_steps:
        return "unknown", 0
    key = max(outcome.policy_steps.items(), key=lambda kv: kv[1])[0]
    policy, _, version = key.rpartition(":")
    return (policy or key), int(version) if version.isdigit() else 0


class LoopMonitor:
    """Aggregate the loop's outcomes into windows; record them; render them."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        run_id: str,
        learner_groups: list[str],
        window_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.run_id = run_id
        self.learner_groups = learner_groups
        self.window_s = window_s
        topics = settings.topics
        self.consumer = Consumer(
            {
                **settings.kafka_client_config(),
                "group.id": f"{settings.topic_prefix}recloop-monitor-{run_id}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([topics.outcomes, topics.snapshots, topics.slates])
        self.types: dict[str, type[Watched]] = {
            topics.outcomes: EpisodeOutcome,
            topics.snapshots: PolicyPublished,
            topics.slates: SlateServed,
        }
        self.window: dict[tuple[str, int], ArmWindow] = defaultdict(ArmWindow)
        self.window_start = time.time()
        self.versions: dict[tuple[str, int], VersionInfo] = {}
        self.view = MonitorView()
        self.skipped = 0
        self.refused = 0
        """Announcements refused by ``announced_version``."""
        self._slates_in_window = 0
        self._last_ends: int | None = None
        self.first_slate_at: float | None = None
        """When the first slate was read (``time.monotonic``): serving is up."""

    def poll(self, seconds: float) -> None:
        """Consume for up to ``seconds``; close the window when it is due."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(500, timeout=0.2):
                topic = msg.topic()
                if msg.error() or topic is None:
                    continue
                try:
                    record: Watched = codec.decode(msg.value(), self.types[topic])
                except RecordDecodeError:
                    self.skipped += 1
                    continue
                self._observe(record)
        if time.time() - self.window_start >= self.window_s:
            self.close_window()

    def _observe(self, record: object) -> None:
        if isinstance(record, EpisodeOutcome):
            arm = majority_arm(record)
            self.window[arm].add(record)
            self.view.totals[f"{arm[0]}:{arm[1]}"].add(record)
        elif isinstance(record, PolicyPublished):
            key = (record.policy, record.version)
            if key not in self.versions:
                try:
                    recorded = self.storage.snapshot(record.policy, record.version)
                    self.versions[key] = announced_version(record, self.settings, recorded)
                except SnapshotError:
                    self.refused += 1
                    return
            self.view.versions[record.policy] = max(
                record.version, self.view.versions.get(record.policy, 0)
            )
        elif isinstance(record, SlateServed):
            self._slates_in_window += 1
            if self.first_slate_at is None:
                self.first_slate_at = time.monotonic()
            info = self.versions.get((record.policy, record.policy_version))
            if info is not None and info.first_served_ts is None:
                info.first_served_ts = record.ts
                if info.freshness_s is not None:
                    self.view.freshness_s[record.policy] = info.freshness_s
                    self._sample(
                        "freshness_seconds",
                        info.freshness_s,
                        policy=record.policy,
                        version=str(record.policy_version),
                    )

    def _sample(self, name: str, value: float, **labels: str) -> None:
        self.storage.record_samples(
            self.run_id, [Sample(ts=_dt(time.time()), name=name, value=value, labels=labels)]
        )

    def close_window(self) -> None:
        now = time.time()
        elapsed = max(1e-6, now - self.window_start)
        outcomes = [
            Outcome(
                policy=policy,
                version=version,
                window_start=_dt(self.window_start),
                window_end=_dt(now),
                episodes=w.episodes,
                mean_return=w.mean_return,
                ctr=w.clicks / max(1, w.steps),
                clicked_quality=w.quality_sum / max(1, w.clicks),
                served_slates=w.steps,
                return_sd=w.return_sd,
            )
            for (policy, version), w in self.window.items()
            if w.episodes
        ]
        self.storage.record_outcomes(self.run_id, outcomes)
        self.view.slates_per_s = self._slates_in_window / elapsed
        self.view.events_per_s = self._event_rate(elapsed)
        lags = []
        for group in self.learner_groups:
            lags += kafka_lag.group_lag(self.settings, group, [self.settings.topics.transitions])
        self.view.learner_lag, self.view.learner_lag_s = kafka_lag.total(lags)
        samples = [
            Sample(ts=_dt(now), name="learner_lag_messages", value=float(self.view.learner_lag)),
            Sample(ts=_dt(now), name="events_per_second", value=self.view.events_per_s),
            Sample(ts=_dt(now), name="slates_per_second", value=self.view.slates_per_s),
        ]
        if self.view.learner_lag_s is not None:
            samples.append(
                Sample(ts=_dt(now), name="learner_lag_seconds", value=self.view.learner_lag_s)
            )
        for (policy, version), info in self.versions.items():
            if version == self.view.versions.get(policy):
                samples.append(
                    Sample(
                        ts=_dt(now),
                        name="model_age_seconds",
                        value=now - info.created_ts,
                        labels={"policy": policy},
                    )
                )
        self.storage.record_samples(self.run_id, samples)
        self.window = defaultdict(ArmWindow)
        self.window_start = now
        self._slates_in_window = 0

    def _event_rate(self, elapsed: float) -> float:
        """Records per second written to requests, slates and feedback (from log-end offsets)."""
        topics = self.settings.topics
        ends = 0
        for topic in (topics.requests, topics.slates, topics.feedback):
            for p in range(self.settings.partitions):
                _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
                ends += high
        rate = 0.0 if self._last_ends is None else (ends - self._last_ends) / elapsed
        self._last_ends = ends
        return rate

    def table(self) -> Table:
        view = self.view
        table = Table(title="recloop live loop", expand=False)
        for column in ("policy", "versions", "episodes", "mean return", "CTR", "clicked quality"):
            table.add_column(column, justify="right")
        for (policy, _learned), (w, low, high) in sorted(_by_stage(view.totals).items()):
            table.add_row(
                policy,
                f"v{low}" if low == high else f"v{low}-v{high}",
                str(w.episodes),
                f"{w.mean_return:.1f}{w.return_ci95()}",
                f"{w.clicks / max(1, w.steps):.3f}",
                f"{w.quality_sum / max(1, w.clicks):.2f}",
            )
        lag_s = "-" if view.learner_lag_s is None else f"{view.learner_lag_s:.1f}s"
        fresh = ", ".join(f"{p} {s:.1f}s" for p, s in view.freshness_s.items()) or "-"
        versions = ", ".join(f"{p} v{v}" for p, v in view.versions.items()) or "none yet"
        table.caption = (
            f"events/s {view.events_per_s:,.0f} | slates/s {view.slates_per_s:,.0f} | "
            f"learner lag {view.learner_lag} msgs ({lag_s}) | snapshot {versions} | "
            f"freshness {fresh}"
        )
        return table

    def close(self) -> None:
        self.close_window()
        self.consumer.close()


def _by_stage(totals: dict[str, ArmWindow]) -> dict[tuple[str, bool], tuple[ArmWindow, int, int]]:
    """Totals per policy, split into its fallback (v0) and its learned versions (v >= 1).

    A long run publishes dozens of versions; one row per version would scroll the view away.
    """
    out: dict[tuple[str, bool], tuple[ArmWindow, int, int]] = {}
    for key, w in totals.items():
        if not w.episodes:
            continue
        policy, _, raw = key.rpartition(":")
        version = int(raw) if raw.isdigit() else 0
        stage = (policy, version >= 1)
        acc, low, high = out.get(stage, (ArmWindow(), version, version))
        acc.episodes += w.episodes
        acc.return_sum += w.return_sum
        acc.return_sq_sum += w.return_sq_sum
        acc.steps += w.steps
        acc.clicks += w.clicks
        acc.quality_sum += w.quality_sum
        out[stage] = (acc, min(low, version), max(high, version))
    return out
