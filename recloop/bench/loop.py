"""``recloop bench loop``: model freshness and learner lag of the whole loop at a fixed rate.

The loop runs as in the demo (sim at a fixed request rate, streams, learn, serve as separate
processes). Afterwards the benchmark reads the topics back and measures, per event:

- **freshness**: for every transition (its outcome time ``outcome_ts``), the first snapshot
  that learned from it is the first whose manifest's consumed offset on that partition is
  past the transition's offset; freshness is the time of the first slate served by that
  version minus ``outcome_ts``. Events never covered by a served version are counted apart.
- **learner lag**: the learner's own gauge (messages behind the log end, and seconds), scraped
  every second from its Prometheus endpoint.

The raw baseline beside them is the snapshot interval the learner was told to keep: no
pipeline can be fresher than the time it waits before publishing.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from recloop.core.events import SlateServed, Transition
from recloop.core.settings import Settings
from recloop.core.snapshot import describe_snapshot
from recloop.kafka.admin import create_topics
from recloop.kafka.read import read_topic
from recloop.ops.broker import LocalBroker, free_port, port_open
from recloop.ops.demo import ChildProcesses


@dataclass(frozen=True)
class LoopBenchConfig:
    rate: float = 60.0
    """Requests per second the simulator sends."""
    duration_s: float = 120.0
    users: int = 32
    algo: str = "slateq"
    snapshot_seconds: float = 5.0


def _scrape_lag(port: int) -> tuple[float, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    messages = seconds = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "recloop_learner_lag_messages":
                messages += sample.value
            elif sample.name == "recloop_learner_lag_seconds":
                seconds = max(seconds, sample.value)
    return messages, seconds


def freshness(
    transitions: list[tuple[int, int, Transition]],
    covered_offsets: list[tuple[int, dict[int, int]]],
    first_served: dict[int, float],
) -> tuple[list[float], int]:
    """Per-event freshness (seconds) and how many events no served version covered."""
    versions = sorted(covered_offsets)
    out, uncovered = [], 0
    for partition, offset, t in transitions:
        version = next(
            (
                v
                for v, offsets in versions
                if offsets.get(partition, 0) > offset and v in first_served
            ),
            None,
        )
        if version is None:
            uncovered += 1
        else:
            out.append(first_served[version] - t.outcome_ts)
    return out, uncovered


def run_loop_bench(config: LoopBenchConfig, bootstrap: str | None, work: Path) -> dict:
    broker = None
    if bootstrap is None or not port_open(int(bootstrap.rsplit(":", 1)[1])):
        broker = LocalBroker(work / "broker", die_with_parent=True).start()
        bootstrap = broker.bootstrap
    prefix = f"bench-loop-{int(time.time())}."
    settings = Settings(
        kafka_bootstrap=bootstrap, topic_prefix=prefix, home=work, snapshot_dir=work / "snapshots"
    )
    create_topics(settings)
    metrics_port = free_port()
    env = {
        **os.environ, "RECLOOP_KAFKA_BOOTSTRAP": bootstrap, "RECLOOP_TOPIC_PREFIX": prefix,
        "RECLOOP_HOME": str(work), "RECLOOP_SNAPSHOT_DIR": str(work / "snapshots"),
    }  # fmt: skip
    (work / "logs").mkdir(parents=True, exist_ok=True)
    children = ChildProcesses(work / "logs", env)
    learner = ChildProcesses(work / "logs", {**env, "RECLOOP_METRICS_PORT": str(metrics_port)})
    lag_samples: list[tuple[float, float]] = []
    try:
        children.start(
            "streams",
            ["streams", "--app-id", f"{prefix}streams", "--data-dir", str(work / "streams-data")],
        )
        learner.start(
            "learn",
            [
                "learn",
                "--algo",
                config.algo,
                "--snapshot-every",
                "100000",
                "--snapshot-seconds",
                str(config.snapshot_seconds),
                "--config",
                "update_every=8",
            ],
        )
        children.start("serve", ["serve", "--policy", config.algo])
        children.start(
            "sim",
            [
                "sim",
                "--users",
                str(config.users),
                "--rate",
                str(config.rate),
                "--duration",
                str(config.duration_s),
                "--slate-timeout",
                "30",
            ],
        )
        deadline = time.monotonic() + config.duration_s
        while time.monotonic() < deadline:
            sample = _scrape_lag(metrics_port)
            if sample is not None:
                lag_samples.append(sample)
            time.sleep(1.0)
    finally:
        children.stop()
        learner.stop()
    transitions = read_topic(settings, settings.topics.transitions, Transition)
    slates = read_topic(settings, settings.topics.slates, SlateServed)
    if broker is not None:
        broker.stop()
    first_served: dict[int, float] = {}
    for _, _, s in slates:
        if s.policy == config.algo and s.policy_version:
            first_served[s.policy_version] = min(s.ts, first_served.get(s.policy_version, s.ts))
    covered = []
    root = work / "snapshots" / config.algo
    for path in sorted(root.glob("v*")) if root.exists() else []:
        ref = describe_snapshot(path)
        offsets = ref.manifest["consumed_offsets"].get(settings.topics.transitions, {})
        covered.append((ref.version, {int(p): int(o) for p, o in offsets.items()}))
    fresh, uncovered = freshness(transitions, covered, first_served)
    lags = np.array(lag_samples) if lag_samples else np.zeros((1, 2))
    elapsed = config.duration_s
    return {
        "bench": "loop",
        "rate_rps": config.rate,
        "duration_s": elapsed,
        "transitions": len(transitions),
        "transitions_per_s": round(len(transitions) / elapsed, 1),
        "snapshots": len(covered),
        "served_versions": len(first_served),
        "freshness_p50_s": round(float(np.percentile(fresh, 50)), 2) if fresh else None,
        "freshness_p99_s": round(float(np.percentile(fresh, 99)), 2) if fresh else None,
        "events_not_yet_served": uncovered,
        "snapshot_interval_s": config.snapshot_seconds,
        "learner_lag_messages_p50": float(np.percentile(lags[:, 0], 50)),
        "learner_lag_messages_p99": float(np.percentile(lags[:, 0], 99)),
        "learner_lag_seconds_p50": round(float(np.percentile(lags[:, 1], 50)), 2),
        "learner_lag_seconds_p99": round(float(np.percentile(lags[:, 1], 99)), 2),
    }


def print_figures(figures: dict, console) -> None:
    console.print(
        f"loop at {figures['rate_rps']:.0f} requests/s for {figures['duration_s']:.0f} s: "
        f"{figures['transitions']} transitions, {figures['snapshots']} snapshots, "
        f"{figures['served_versions']} served versions"
    )
    console.print(
        f"freshness p50 {figures['freshness_p50_s']} s, p99 {figures['freshness_p99_s']} s "
        f"(snapshot interval {figures['snapshot_interval_s']} s; "
        f"{figures['events_not_yet_served']} events not yet served by a learned version)"
    )
    console.print(
        f"learner lag p50 {figures['learner_lag_messages_p50']:.0f} msgs / "
        f"{figures['learner_lag_seconds_p50']} s, p99 {figures['learner_lag_messages_p99']:.0f}"
        f" msgs / {figures['learner_lag_seconds_p99']} s"
    )
    print(json.dumps(figures, sort_keys=True))
