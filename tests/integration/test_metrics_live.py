"""Every process's Prometheus endpoint during a short live run, on the real broker.

Counters must move as events flow, and learner lag must rise while the learner is paused
(SIGSTOP) and fall again once it resumes (SIGCONT).
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from recloop.core.settings import Settings
from recloop.ops.broker import free_port
from recloop.ops.demo import ChildProcesses

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass  # endpoint not up yet
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_move_and_learner_lag_follows_a_pause(kafka_settings: Settings, tmp_path: Path):
    ports = {name: free_port() for name in ("streams", "learn", "serve", "sim")}
    base_env = {
        **os.environ,
        "RECLOOP_KAFKA_BOOTSTRAP": kafka_settings.kafka_bootstrap,
        "RECLOOP_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "RECLOOP_HOME": str(tmp_path),
        "RECLOOP_PARTITIONS": str(kafka_settings.partitions),
    }
    (tmp_path / "logs").mkdir()
    procs = {}
    try:
        for name, args in (
            ("streams", ["streams", "--app-id", f"{kafka_settings.topic_prefix}streams",
                         "--data-dir", str(tmp_path / "streams-data")]),
            ("learn", ["learn", "--algo", "slateq", "--snapshot-every", "200",
                       "--snapshot-seconds", "2", "--config", "update_every=8"]),
            ("serve", ["serve", "--policy", "slateq=0.5", "--policy", "random=0.5"]),
            ("sim", ["sim", "--users", "16", "--rate", "60", "--slate-timeout", "30"]),
        ):
            children = ChildProcesses(tmp_path / "logs", {
                **base_env, "RECLOOP_METRICS_PORT": str(ports[name])
            })
            children.start(name, args)
            procs[name] = children

        # Events flow: each process's counters move (wait_for fails the test if one does not).
        def flowing(name: str, metric: str, **labels: str) -> None:
            wait_for(lambda: total(scrape(ports[name]), metric, **labels) > 0, 120,
                     f"{name} {metric}")  # fmt: skip
            before = total(scrape(ports[name]), metric, **labels)
            # The learner applies transitions in bursts (a poll, then its updates): allow time.
            wait_for(
                lambda: total(scrape(ports[name]), metric, **labels) > before, 60,
                f"{name} {metric} to grow past {before}",
            )

        flowing("sim", "recloop_records_out_total", topic=kafka_settings.topics.requests)
        flowing("serve", "recloop_records_out_total", topic=kafka_settings.topics.slates)
        flowing("serve", "recloop_serving_latency_seconds_count")
        flowing("streams", "recloop_records_out_total", topic=kafka_settings.topics.transitions)
        flowing("learn", "recloop_transitions_applied_total")
        wait_for(lambda: total(scrape(ports["sim"]), "recloop_sim_episodes_total") > 0, 180,
                 "a finished simulated session")
        wait_for(lambda: total(scrape(ports["learn"]), "recloop_snapshot_version") >= 1, 120,
                 "a snapshot")
        wait_for(lambda: total(scrape(ports["serve"]), "recloop_snapshot_version") >= 1, 60,
                 "serving a snapshot")

        # Lag: settle, pause the learner, resume, and watch the gauge rise and fall.
        learner = procs["learn"].procs["learn"]
        lag_before = total(scrape(ports["learn"]), "recloop_learner_lag_messages")
        os.kill(learner.pid, signal.SIGSTOP)
        time.sleep(15)
        os.kill(learner.pid, signal.SIGCONT)
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen.append(total(scrape(ports["learn"]), "recloop_learner_lag_messages"))
            if len(seen) > 3 and max(seen) > lag_before and seen[-1] < max(seen) / 2:
                break
            time.sleep(0.5)
        assert max(seen) > lag_before + 20, (lag_before, seen)
        assert seen[-1] < max(seen) / 2, seen
    finally:
        for children in procs.values():
            for proc in children.procs.values():
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
            children.stop()
