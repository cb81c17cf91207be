"""The in-process loop and the Kafka path are the same services: given the same seed and the
same users they make the same transitions.

Kafka path: the real processes, ``recloop serve`` (the built-in random arm) and
``recloop streams`` (faust) as subprocesses, and the simulator's service on the broker. In
process: ``recloop.inprocess.build_loop`` on the memory bus. One user at a time, so both
paths ask serving's generator for the same draws in the same order; the transitions must
then agree by id, and in what was served and what came of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recloop.core import codec
from recloop.core.events import Transition
from recloop.core.settings import Settings
from recloop.inprocess import build_loop
from recloop.kafka.read import end_offsets, read_topic
from recloop.producer_sim.presets import make_world
from recloop.services.sim import SimConfig, SimService
from recloop.serving.split import TrafficSplit

pytestmark = pytest.mark.integration

SEED, SESSIONS, RUN_TAG = 5, 4, "same-users"


def _key(t: Transition) -> tuple:
    return (t.transition_id, t.request_id, tuple(t.slate), t.chosen_item, t.reward, t.done,
            t.policy, tuple(t.state.history))  # fmt: skip


def _in_process() -> list[Transition]:
    world = make_world("tiny_world", seed=SEED)
    loop = build_loop(world, {}, SESSIONS, SEED, split=TrafficSplit((("random", 1.0),)),
                      users_in_parallel=1, run_tag=RUN_TAG)  # fmt: skip
    loop.run()
    return [codec.decode(m.value, Transition) for m in loop.bus.records(loop.sim.topics.transitions)]


def _start(settings: Settings, tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    env = {
        **os.environ, "RECLOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "RECLOOP_TOPIC_PREFIX": settings.topic_prefix, "RECLOOP_HOME": str(settings.home),
        "RECLOOP_PARTITIONS": str(settings.partitions), "RECLOOP_METRICS_PORT": "0",
    }  # fmt: skip
    log = (tmp_path / f"{name}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "recloop", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    log.close()
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_in_process_services_and_kafka_make_the_same_transitions(kafka_settings, tmp_path):
    expected = _in_process()
    assert len(expected) >= SESSIONS * 2 and sum(t.done for t in expected) == SESSIONS
    # Serving is given no world: it waits for the catalogue the simulator publishes.
    serve = _start(kafka_settings, tmp_path, "serve", "serve", "--policy", "random",
                   "--seed", str(SEED))  # fmt: skip
    streams = _start(kafka_settings, tmp_path, "streams", "streams", "--no-create",
                     "--data-dir", str(tmp_path / "streams"), "--batch-within", "0.02")  # fmt: skip
    logs = lambda: "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))  # noqa: E731
    try:
        sim = SimService(kafka_settings, SimConfig(preset="tiny_world", users=1, seed=SEED,
                                                   max_sessions=SESSIONS, run_tag=RUN_TAG,
                                                   slate_timeout_s=60.0))  # fmt: skip
        deadline = time.monotonic() + 120
        stats = sim.run(lambda: time.monotonic() > deadline)
        assert stats.outcomes == SESSIONS, logs()
        topic = kafka_settings.topics.transitions
        while end_offsets(kafka_settings, topic) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.5)
        got = [value for _, _, value in read_topic(kafka_settings, topic, Transition)]
    finally:
        _stop(serve)
        _stop(streams)
    assert sorted(map(_key, got)) == sorted(map(_key, expected)), logs()
