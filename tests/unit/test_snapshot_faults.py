"""The learner resumes past damaged snapshots and never re-uses a version (issue 11, item 3).

The real ``LearnerService`` with ``DiskSnapshots`` over files under ``tmp_path``, a SQLite
``Storage`` and a ``MemoryBus``; a "crash" is a learner dropped without closing and a new
one started on the same bus, disk and database.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from recloop.core import codec
from recloop.core.events import PolicyPublished
from recloop.core.membus import MemoryBus
from recloop.core.settings import Settings
from recloop.core.snapshot import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    SnapshotError,
    read_snapshot,
    snapshot_dir,
    snapshot_versions,
    write_snapshot,
)
from recloop.learner.publishing import id_digest
from recloop.services.learn import LearnConfig, LearnerService
from recloop.storage.store import Storage
from tests.unit.learner.synth import SPEC, make_catalogue, make_transitions

POLICY = "mf"
EVERY = 20
TRANSITIONS = make_transitions(SPEC, n=6 * EVERY)


class Loop:
    """One learner's world: settings, database and bus that outlive any one learner."""

    def __init__(self, tmp_path: Path, bus: MemoryBus | None = None) -> None:
        self.settings = Settings(home=tmp_path)
        self.storage = Storage(self.settings.resolved_database_url)
        self.bus = bus or MemoryBus(self.settings.partitions)
        self.produced = 0

    @property
    def root(self) -> Path:
        return self.settings.resolved_snapshot_dir

    def produce(self, count: int) -> None:
        for t in TRANSITIONS[self.produced : self.produced + count]:
            self.bus.publish(self.settings.topics.transitions, t.user_id.encode(), codec.encode(t))
        self.produced += count
        self.bus.flush()

    def learner(self, **config) -> LearnerService:
        learn = LearnConfig(algo="mf", policy=POLICY, snapshot_every_transitions=EVERY,
                            snapshot_every_s=math.inf, poll_max=EVERY, poll_timeout_s=0.0,
                            **config)  # fmt: skip
        return LearnerService(self.settings, learn, SPEC, self.storage, bus=self.bus,
                              catalogue=make_catalogue())  # fmt: skip

    def announced(self) -> list[PolicyPublished]:
        records = self.bus.records(self.settings.topics.snapshots)
        return [codec.decode(m.value, PolicyPublished) for m in records]

    def dir(self, version: int) -> Path:
        return snapshot_dir(self.root, POLICY, version)


def refused() -> float:
    labels = {"process": "learner", "policy": POLICY}
    return REGISTRY.get_sample_value("recloop_snapshots_refused_total", labels) or 0.0


def flip_weights(path: Path) -> None:
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.fixture
def loop(tmp_path: Path) -> Loop:
    """A learner that published v1 (20 transitions) and v2 (40), then crashed."""
    world = Loop(tmp_path)
    learner = world.learner()
    world.produce(2 * EVERY)
    assert learner.step() == EVERY and learner.step() == EVERY
    assert learner.progress.version == 2
    return world


def test_flipped_bytes_in_the_newest_fall_back_to_the_one_before(loop, caplog):
    flip_weights(loop.dir(2))
    before = refused()
    with caplog.at_level(logging.WARNING):
        learner = loop.learner()
    assert learner.progress.version == 1 and learner.progress.transitions_applied == EVERY
    assert refused() == before + 1
    assert "refused snapshot mf v2" in caplog.text

    # v1's offsets are where it reads from: the 20 transitions after v1 are applied again
    # (v1's agent never saw them), and the next snapshot is v3, never v2 again.
    assert learner.step() == EVERY
    assert learner.progress.version == 3 and learner.progress.transitions_applied == 2 * EVERY
    applied = id_digest(t.transition_id for t in TRANSITIONS[: 2 * EVERY])
    assert learner.progress.applied_digest == applied  # each once, none lost
    assert loop.storage.snapshot(POLICY, 3) is not None
    assert [p.version for p in loop.announced()] == [1, 2, 1, 3]  # v1 again on resume
    assert loop.dir(2).exists()  # left where it was, for whoever looks into it


def test_a_manifest_edited_into_other_valid_json_is_refused_against_storage(loop, caplog):
    manifest_path = loop.dir(2) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["transitions_applied"] = 999
    manifest_path.write_text(json.dumps(manifest))
    read_snapshot(loop.dir(2))  # still a well-formed snapshot: only the record tells

    with caplog.at_level(logging.WARNING):
        learner = loop.learner()
    assert learner.progress.version == 1
    assert "recorded" in caplog.text


def test_a_snapshot_storage_does_not_know_is_verified_then_recorded(loop, tmp_path):
    # A crash between writing v2 and recording it: a database without the row.
    unrecorded = Loop(tmp_path / "elsewhere", loop.bus)
    unrecorded.settings = unrecorded.settings.model_copy(update={"snapshot_dir": loop.root})
    assert unrecorded.storage.snapshot(POLICY, 2) is None
    learner = unrecorded.learner()
    assert learner.progress.version == 2
    recorded, original = unrecorded.storage.snapshot(POLICY, 2), loop.storage.snapshot(POLICY, 2)
    assert recorded is not None and original is not None
    assert recorded["manifest_sha256"] == original["manifest_sha256"]
    assert recorded["weights_sha256"] == original["weights_sha256"]


def test_a_bad_directory_moved_aside_never_lends_its_version(loop):
    loop.dir(2).rename(loop.dir(2).with_name("v00000002.bad"))
    learner = loop.learner()
    assert learner.progress.version == 1
    assert learner.step() == EVERY  # what v1 had not learned, again
    assert learner.progress.version == 3  # storage knows v2
    assert [v for v, _ in snapshot_versions(loop.root, POLICY)] == [3, 1]


def test_every_snapshot_damaged_starts_afresh_above_the_highest_version(loop):
    flip_weights(loop.dir(1))
    flip_weights(loop.dir(2))
    before = refused()
    learner = loop.learner()
    assert learner.progress.version == 0 and refused() == before + 2
    loop.produce(EVERY)
    learner.step()
    assert learner.progress.version == 3


def test_snapshot_versions_lists_damaged_directories_newest_first(tmp_path):
    manifest = {"algorithm": "a", "config": {}, "metrics": {}, "consumed_offsets": {},
                "transitions_applied": 0}  # fmt: skip
    for version in (3, 12, 7):
        write_snapshot(tmp_path, "p", version, {}, manifest)
    (snapshot_dir(tmp_path, "p", 12) / MANIFEST_FILE).write_bytes(b"not json")
    (tmp_path / "p" / ".tmp-v00000013-1-ab").mkdir()
    assert [v for v, _ in snapshot_versions(tmp_path, "p")] == [12, 7, 3]
    assert snapshot_versions(tmp_path, "nobody") == []
    with pytest.raises(SnapshotError):
        read_snapshot(snapshot_dir(tmp_path, "p", 12))
