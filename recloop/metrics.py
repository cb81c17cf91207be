"""Prometheus metrics every recloop process exposes (prometheus-client).

One module names them all, so dashboards and the test that checks the Grafana JSON read
one list. ``serve_metrics(settings)`` starts the HTTP endpoint on
``settings.metrics_host:settings.metrics_port`` (127.0.0.1 by default; port 0 = off).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from recloop.core.events import EpisodeOutcome, PolicyPublished, SlateServed
from recloop.core.settings import Settings
from recloop.core.snapshot import describe_snapshot

RECORDS_IN = Counter(
    "recloop_records_in_total", "Records consumed and decoded", ["process", "topic"]
)
RECORDS_OUT = Counter("recloop_records_out_total", "Records produced", ["process", "topic"])
DLQ = Counter(
    "recloop_dlq_total", "Records sent to a dead-letter topic", ["process", "topic"]
)
DECODE_ERRORS = Counter(
    "recloop_decode_errors_total", "Records that failed to decode", ["process", "topic"]
)
FOLD_OVERFLOW = Counter(
    "recloop_fold_overflow_total",
    "Records the streams fold refused because a bounded buffer of a user's session state "
    "was full (dead-lettered)",
    ["cap"],
)
LEARNER_LAG_MESSAGES = Gauge(
    "recloop_learner_lag_messages", "Transitions behind the log end", ["policy", "partition"]
)
LEARNER_LAG_SECONDS = Gauge(
    "recloop_learner_lag_seconds",
    "Age of the newest transition the learner has applied, where it is behind",
    ["policy", "partition"],
)
TRANSITIONS_APPLIED = Counter(
    "recloop_transitions_applied_total", "Transitions applied by the learner", ["policy"]
)
DUPLICATES_DROPPED = Counter(
    "recloop_duplicates_dropped_total", "Re-delivered transitions dropped by id", ["policy"]
)
SNAPSHOT_VERSION = Gauge(
    "recloop_snapshot_version", "Latest snapshot version", ["process", "policy"]
)
SNAPSHOT_CREATED = Gauge(
    "recloop_snapshot_created_timestamp_seconds",
    "Creation time of the latest snapshot (age = time() - this)",
    ["process", "policy"],
)
MODEL_FRESHNESS = Gauge(
    "recloop_model_freshness_seconds",
    "From the newest event a served snapshot learned from to its first served slate",
    ["policy"],
)
SERVING_LATENCY = Histogram(
    "recloop_serving_latency_seconds",
    "From request timestamp to slate produced",
    ["policy"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SIM_RETURN = Gauge(
    "recloop_sim_return", "Mean ground-truth session return, last window", ["policy", "version"]
)
SIM_CTR = Gauge("recloop_sim_ctr", "Ground-truth clicks per slate, last window", ["policy", "version"])
SIM_EPISODES = Counter("recloop_sim_episodes_total", "Finished sessions", ["policy", "version"])
WAITING_FOR_BROKER = Gauge(
    "recloop_waiting_for_broker",
    "1 while the process waits for the broker to come back (deliveries or commits stalled)",
    ["process"],
)
SNAPSHOTS_REFUSED = Counter(
    "recloop_snapshots_refused_total",
    "Snapshots refused as damaged or not matching their record (an older valid one is used)",
    ["process", "policy"],
)
SERVING_BEHIND_NEWEST = Gauge(
    "recloop_serving_behind_newest",
    "Newest announced version minus the version serving (0: serving the newest)",
    ["policy"],
)

ALL_METRICS = (
    RECORDS_IN, RECORDS_OUT, DLQ, DECODE_ERRORS, LEARNER_LAG_MESSAGES, LEARNER_LAG_SECONDS,
    TRANSITIONS_APPLIED, DUPLICATES_DROPPED, SNAPSHOT_VERSION, SNAPSHOT_CREATED,
    MODEL_FRESHNESS, SERVING_LATENCY, SIM_RETURN, SIM_CTR, SIM_EPISODES, WAITING_FOR_BROKER,
    SNAPSHOTS_REFUSED, SERVING_BEHIND_NEWEST,
)  # fmt: skip


def exported_names() -> set[str]:
    """Every sample name a scrape can show (counters add _total, histograms _bucket...)."""
    names: set[str] = set()
    for metric in ALL_METRICS:
        for family in metric.describe():
            for suffix in ("", "_total", "_created", "_bucket", "_sum", "_count"):
                names.add(family.name + suffix)
    return names


def serve_metrics(settings: Settings) -> int | None:
    """Start the scrape endpoint if a port is configured; returns the port."""
    if not settings.metrics_port:
        return None
    start_http_server(settings.metrics_port, addr=settings.metrics_host)
    return settings.metrics_port


# -- what the services export ----------------------------------------------------------------


def export_slates(topic: str, slates: list[SlateServed]) -> None:
    """Prometheus: slates out, and request-to-slate latency per policy."""
    RECORDS_OUT.labels("serve", topic).inc(len(slates))
    for slate in slates:
        SERVING_LATENCY.labels(slate.policy).observe(max(0.0, slate.ts - slate.request_ts))


def export_swap(published: PolicyPublished, path: Path) -> None:
    """Prometheus: the serving version, its age, and how fresh it was when it went live."""
    SNAPSHOT_VERSION.labels("serve", published.policy).set(published.version)
    SNAPSHOT_CREATED.labels("serve", published.policy).set(published.created_ts)
    with contextlib.suppress(Exception):  # freshness is best effort: the manifest is local
        service = describe_snapshot(path).manifest.get("service", {})
        newest = float(service.get("newest_event_ts") or 0.0)
        if newest:
            MODEL_FRESHNESS.labels(published.policy).set(max(0.0, time.time() - newest))


class OutcomeGauges:
    """Prometheus: finished sessions and their ground truth per serving policy version.

    Gauges hold an exponential moving average (weight 0.05 per session), so a dashboard
    sees each version's return and CTR settle without a window of its own. The averages
    belong to this object (one per service), not to the module.
    """

    WEIGHT = 0.05

    def __init__(self) -> None:
        self.ema: dict[tuple[str, str, str], float] = {}

    def export(self, outcome: EpisodeOutcome) -> None:
        policy, version = "unknown", "0"
        if outcome.policy_steps:
            key = max(outcome.policy_steps, key=outcome.policy_steps.__getitem__)
            policy, _, version = key.rpartition(":")
        SIM_EPISODES.labels(policy, version).inc()
        ctr = outcome.clicks / outcome.steps if outcome.steps else 0.0
        for name, gauge, value in (
            ("return", SIM_RETURN, outcome.total_return),
            ("ctr", SIM_CTR, ctr),
        ):
            slot = (name, policy, version)
            previous = self.ema.get(slot)
            self.ema[slot] = value if previous is None else previous + self.WEIGHT * (value - previous)
            gauge.labels(policy, version).set(self.ema[slot])
