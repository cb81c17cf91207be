"""The learner service on the real broker: snapshots, resume, and crash safety under kill -9.

The learner is started as ``recloop learn`` with no world: it waits for the catalogue on the
items + catalogue topics (published here, as the simulator would) and reads its other sizes
off the transitions, or off the snapshot it resumes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recloop.core import codec
from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import PolicyPublished, Transition, UserView
from recloop.core.settings import Settings
from recloop.core.snapshot import latest_snapshot, read_snapshot
from recloop.kafka.bus import KafkaBus
from recloop.kafka.catalogue import publish_catalogue
from recloop.kafka.clients import make_producer
from recloop.services.learn import id_digest
from recloop.storage.store import Storage

pytestmark = pytest.mark.integration

N_ITEMS = 6  # tiny_world's catalogue
CATALOGUE = ItemCatalogue(np.eye(N_ITEMS, dtype=np.float32))


def _transitions(count: int, seed: int) -> list[Transition]:
    """Plausible tiny_world transitions: random slates, clicks on item 0 most of the time."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        user = f"u{i % 37}"
        slate = [int(x) for x in rng.choice(N_ITEMS, size=2, replace=False)]
        clicked = int(rng.integers(0, 2)) if rng.random() < 0.6 else None
        obs = rng.uniform(-1, 1, N_ITEMS).round(3).tolist()
        view = UserView(observation=obs, step=i // 37)
        out.append(
            Transition(
                transition_id=f"{seed:04x}{i:028x}",
                user_id=user,
                session_id=f"s-{user}",
                request_id=f"r{i}",
                state=view,
                slate=slate,
                propensities=[1 / 3, 1 / 3],
                candidates=list(range(N_ITEMS)),
                policy="random",
                policy_version=0,
                chosen_item=slate[clicked] if clicked is not None else None,
                chosen_position=clicked,
                reward=1.0 if clicked is not None else 0.0,
                next_state=view,
                done=False,
                served_ts=time.time(),
                outcome_ts=time.time(),
            )
        )
    return out


def _publish_catalogue(settings: Settings) -> None:
    publish_catalogue(KafkaBus(settings, process="test-catalogue"), settings.topics, CATALOGUE)


def _produce(settings: Settings, transitions: list[Transition]) -> None:
    producer = make_producer(settings)
    for t in transitions:
        producer.produce(settings.topics.transitions, key=t.user_id.encode(), value=codec.encode(t))
        producer.poll(0)
    assert producer.flush(30) == 0


def _learner_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "RECLOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "RECLOOP_TOPIC_PREFIX": settings.topic_prefix,
        "RECLOOP_HOME": str(settings.home),
        "RECLOOP_PARTITIONS": str(settings.partitions),
    }


def _start_learner(settings: Settings, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "recloop",
        "learn",
        "--algo",
        "mf",
        "--snapshot-every",
        "150",
        "--snapshot-seconds",
        "0.5",
    ]
    return subprocess.Popen(
        cmd,
        env=_learner_env(settings),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_applied(settings: Settings, policy: str, want: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    manifest: dict = {}
    while time.monotonic() < deadline:
        ref = latest_snapshot(settings.resolved_snapshot_dir, policy)
        if ref is not None:
            manifest = ref.manifest
            if manifest["transitions_applied"] >= want:
                return manifest
        time.sleep(0.3)
    raise AssertionError(f"learner applied {manifest.get('transitions_applied')} of {want}")


def test_kill_9_at_random_points_loses_nothing_and_applies_nothing_twice(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(7)
    batches = [_transitions(900, seed) for seed in range(4)]
    unique = [t for batch in batches for t in batch]
    log = tmp_path / "learner.log"
    _publish_catalogue(kafka_settings)
    proc = _start_learner(kafka_settings, log)
    try:
        for i, batch in enumerate(batches):
            _produce(kafka_settings, batch)
            # Re-emissions after an upstream crash carry the same ids: they must be dropped.
            _produce(kafka_settings, rng.sample(batch, 50))
            time.sleep(rng.uniform(1.5, 5.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = _start_learner(kafka_settings, log)
            if i == 1:
                # Kill again quickly, possibly before the first poll or mid-snapshot.
                time.sleep(rng.uniform(0.2, 1.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                proc = _start_learner(kafka_settings, log)
        manifest = _wait_applied(kafka_settings, "mf", len(unique), timeout=180)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert manifest["transitions_applied"] == len(unique), log.read_text()[-3000:]
    assert int(manifest["service"]["applied_digest"]) == id_digest(t.transition_id for t in unique)
    assert manifest["service"]["duplicates_dropped"] >= 4 * 50
    # Offsets in the manifest cover everything produced (4 x 950 records over 4 partitions).
    consumed = manifest["consumed_offsets"][kafka_settings.topics.transitions]
    assert sum(consumed.values()) == 4 * 950


def test_snapshot_is_recorded_announced_and_loadable(kafka_settings: Settings, tmp_path: Path):
    from confluent_kafka import Consumer

    _produce(kafka_settings, _transitions(400, seed=11))
    _publish_catalogue(kafka_settings)
    proc = _start_learner(kafka_settings, tmp_path / "learner.log")
    try:
        manifest = _wait_applied(kafka_settings, "mf", 400, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, (tmp_path / "learner.log").read_text()[-3000:]
    ref = latest_snapshot(kafka_settings.resolved_snapshot_dir, "mf")
    tensors, read_manifest = read_snapshot(ref.path, ref.weights_sha256, ref.manifest_sha256)
    assert read_manifest["version"] == ref.version >= 1 and manifest["algorithm"] == "mf"
    # Sizes from the catalogue (6 items, 6 features) and the transitions (U 6, K 2, N 6).
    assert read_manifest["spec"] == {"n_items": 6, "user_obs_dim": 6, "item_feature_dim": 6,
                                     "slate_size": 2, "num_candidates": 6, "history_len": 5}
    assert read_manifest["catalogue"]["sha256"] == CATALOGUE.sha256
    with Storage.from_settings(kafka_settings) as storage:
        recorded = storage.latest_snapshot("mf")
    assert recorded is not None and recorded["version"] == ref.version
    assert recorded["weights_sha256"] == ref.weights_sha256

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_settings.kafka_bootstrap,
            "group.id": "t-announce",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([kafka_settings.topics.snapshots])
    seen: list[PolicyPublished] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(p.version == ref.version for p in seen):
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            seen.append(codec.decode(msg.value(), PolicyPublished))
    consumer.close()
    versions = [p.version for p in seen]
    assert versions == sorted(versions) and ref.version in versions
    last = next(p for p in seen if p.version == ref.version)
    assert last.weights_sha256 == ref.weights_sha256 and last.manifest_sha256 == ref.manifest_sha256


def test_without_a_catalogue_recloop_learn_ends_with_one_line_saying_what_to_start(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    env = {**_learner_env(kafka_settings), "RECLOOP_CATALOGUE_WAIT_S": "2"}
    done = subprocess.run([sys.executable, "-m", "recloop", "learn", "--algo", "mf"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("recloop learn: no complete catalogue on ")
    assert "recloop sim" in last and "RECLOOP_CATALOGUE_WAIT_S" in last
