"""The streams worker rides out a broker outage under traffic and loses nothing.

A ``recloop streams`` worker folds the first half of a workload; the broker is killed
(SIGKILL) while more records are being produced, stays away ``OUTAGE_S``, comes back, and the
rest follows. The worker must live through it, say "waiting for the broker" (log and
``recloop_waiting_for_broker{process="streams"}``, scraped from its metrics endpoint), and in
the end every transition the fold implies must be on ``rec.transitions``.

The synthetic timestamps are years old, as a backlog's are, and the worker keeps its default
session timeout (30 min) with a sweep every second. It used to end every open session at the
first sweep once the records paused (the sweep judged idleness by wall clock against the
events' ``ts``), so the records after the outage were dropped as late events of ended
sessions: 1,089 of 2,400 transitions in the first report of this. Now idleness counts from
when the worker began watching, and the sweep stands still while the broker is away.

The test has a broker of its own, since it kills it; the broker is started and restarted from
the test's own thread, because its parent-death signal is bound to the thread that spawned it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from recloop.core import codec
from recloop.core.events import Record, SlateServed, Transition
from recloop.core.settings import Settings
from recloop.kafka.admin import create_topics
from recloop.kafka.bus import KafkaBus
from recloop.kafka.read import read_topic
from recloop.ops.broker.config import free_port
from recloop.streams import fold
from recloop.streams.synthetic import SyntheticConfig, causal_events

pytestmark = pytest.mark.integration

OUTAGE_S = 25.0  # longer than the worker's 10 s group session and many sweeps
WORKLOAD = SyntheticConfig(users=150, sessions=2, steps=3, seed=3)


def start_worker(settings: Settings, tmp_path: Path, metrics_port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "RECLOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "RECLOOP_TOPIC_PREFIX": settings.topic_prefix,
        "RECLOOP_PARTITIONS": str(settings.partitions),
        "RECLOOP_HOME": str(tmp_path),
        "RECLOOP_METRICS_PORT": str(metrics_port),
    }
    cmd = [
        sys.executable, "-m", "recloop", "streams", "--no-create", "--batch-within", "0.02",
        "--expiry-interval", "1",  # the default session timeout stays: 30 min
    ]  # fmt: skip
    with open(tmp_path / "streams.log", "wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def publish(bus: KafkaBus, settings: Settings, events: list[Record]) -> None:
    for event in events:
        topic = (
            settings.topics.slates if isinstance(event, SlateServed) else settings.topics.feedback
        )
        user: str = event.user_id  # type: ignore[attr-defined]
        bus.publish(topic, user.encode(), codec.encode(event))


def expected_ids(events: list[Record]) -> set[str]:
    """The transitions the fold implies, folding the events in causal order."""
    states: dict[str, fold.FoldState] = {}
    ids: set[str] = set()
    for event in events:
        user: str = event.user_id  # type: ignore[attr-defined]
        states[user], out = fold.apply(states.get(user), event)
        ids.update(t.transition_id for t in out)
    return ids


def transition_ids(settings: Settings) -> set[str]:
    return {
        t.transition_id for _, _, t in read_topic(settings, settings.topics.transitions, Transition)
    }


def wait_for_transitions(settings: Settings, want: set[str], timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    got = transition_ids(settings)
    while not want <= got and time.monotonic() < deadline:
        time.sleep(1.0)
        got = transition_ids(settings)
    return got


def waiting_gauge(metrics_port: int) -> float | None:
    """``recloop_waiting_for_broker{process="streams"}`` as the worker exports it."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "recloop_waiting_for_broker" and sample.labels == {
                "process": "streams"
            }:
                return sample.value
    return None


def test_the_worker_rides_out_a_broker_outage_under_traffic(own_broker, tmp_path):
    settings = Settings(kafka_bootstrap=own_broker.bootstrap, topic_prefix="outage.",
                        partitions=2, home=tmp_path)  # fmt: skip
    create_topics(settings)
    events = causal_events(WORKLOAD)
    want = expected_ids(events)
    assert len(want) == WORKLOAD.users * WORKLOAD.sessions * WORKLOAD.steps
    half, three_quarters = len(events) // 2, len(events) * 3 // 4
    metrics_port = free_port()
    worker = start_worker(settings, tmp_path, metrics_port)
    worker_log = tmp_path / "streams.log"
    bus = KafkaBus(settings, process="outage-test")
    try:
        publish(bus, settings, events[:half])
        bus.flush()
        before = expected_ids(events[:half])
        got = wait_for_transitions(settings, before, timeout=90)
        assert before <= got, f"the worker never folded the first half\n{worker_log.read_text()}"

        assert own_broker.pid is not None
        os.kill(own_broker.pid, signal.SIGKILL)  # the broker dies under traffic
        own_broker.stop()  # reaps the killed process; the data dir stays
        publish(bus, settings, events[half:three_quarters])  # queued by the producer meanwhile
        waiting_seen: list[float | None] = []
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            waiting_seen.append(waiting_gauge(metrics_port))
            time.sleep(1.0)
        own_broker.start()
        publish(bus, settings, events[three_quarters:])
        bus.flush()

        got = wait_for_transitions(settings, want, timeout=90)
        alive = worker.poll() is None
        log = worker_log.read_text()
        missing = want - got
        assert alive, f"the worker died in the outage (exit {worker.returncode})\n{log[-3000:]}"
        assert not missing and got == want, (
            f"{len(missing)} of {len(want)} transitions missing, {len(got - want)} unexpected"
        )
        assert 1.0 in waiting_seen, f"never reported waiting for the broker: {waiting_seen}"
        assert waiting_gauge(metrics_port) == 0.0, (
            "still reported waiting after the broker came back"
        )
        assert "streams: waiting for the broker" in log
        assert "streams: the broker is back after" in log
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
