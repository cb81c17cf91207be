"""The learner rides out a broker outage while publishing (issue 11, item 2), and learns
only with a catalogue, whose sizes and versions it follows on the bus (issue 13).

``FlakyBus`` is a ``MemoryBus`` whose broker is away for the next ``down`` flushes: each
raises ``DeliveryError`` (as ``KafkaBus.flush`` does) and loses what was published since the
last flush, so an announcement is on the topic only once a flush acknowledged it. The
learner is driven through its public ``step``, ``publish`` and ``run``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np
import pytest
from prometheus_client import REGISTRY

from recloop.core import codec
from recloop.core.events import Transition
from recloop.core.membus import MemoryBus
from recloop.core.settings import Settings
from recloop.core.snapshot import read_snapshot, snapshot_versions
from recloop.kafka.catalogue import publish_catalogue
from recloop.kafka.clients import DeliveryError
from recloop.learner.publishing import id_digest
from recloop.producer_sim.presets import make_world
from recloop.services.learn import LearnConfig, LearnerService, NoCatalogue
from recloop.storage.store import Storage
from tests.unit.learner.synth import SPEC, make_catalogue
from tests.unit.test_snapshot_faults import EVERY, POLICY, TRANSITIONS, Loop
from tests.unit.test_world_spec import world_transitions


class FlakyBus(MemoryBus):
    """A ``MemoryBus`` whose next ``down`` flushes fail and drop what they were to deliver."""

    def __init__(self) -> None:
        super().__init__()
        self.down = 0
        self.queued: list[tuple[str, bytes | None, bytes, tuple[tuple[str, bytes], ...]]] = []
        self.waiting_at_flush: list[float | None] = []
        self.fail_with: Exception | None = None

    def publish(self, topic: str, key: bytes | None, value: bytes,
                headers: Sequence[tuple[str, bytes]] = ()) -> None:  # fmt: skip
        self.queued.append((topic, key, value, tuple(headers)))

    def flush(self, timeout: float | None = None) -> None:
        self.waiting_at_flush.append(waiting())
        queued, self.queued = self.queued, []
        if self.fail_with is not None:
            raise self.fail_with
        if self.down > 0:
            self.down -= 1
            raise DeliveryError(f"{len(queued)} message(s) still queued after 30 s")
        for record in queued:
            super().publish(*record)


def waiting() -> float | None:
    return REGISTRY.get_sample_value("recloop_waiting_for_broker", {"process": "learner"})


def committed(loop: Loop) -> dict[str, dict[str, int]]:
    """The learner group's committed offsets, shaped like a manifest's ``consumed_offsets``."""
    group = loop.bus.committed.get(f"recloop-learner-{POLICY}", {})
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in group.items():
        out.setdefault(topic, {})[str(partition)] = offset
    return out


def manifest(loop: Loop, version: int) -> dict:
    return read_snapshot(loop.dir(version))[1]


@pytest.fixture
def loop(tmp_path: Path) -> Loop:
    """The snapshot tests' learner world on a flaky bus that already holds the catalogue."""
    loop = Loop(tmp_path, FlakyBus())
    publish_catalogue(loop.bus, loop.settings.topics, make_catalogue(SPEC))
    return loop


def test_a_failed_announcement_is_sent_again_and_its_offsets_wait_for_it(loop):
    bus: FlakyBus = loop.bus  # type: ignore[assignment]
    learner = loop.learner()
    loop.produce(EVERY)
    bus.down = 3
    for _ in range(3):
        with pytest.raises(DeliveryError):
            learner.step()
        # Written and recorded, its version taken; not announced, nothing committed.
        assert learner.progress.version == 1 and loop.storage.snapshot(POLICY, 1) is not None
        assert loop.announced() == [] and committed(loop) == {}

    assert learner.step() == 0  # the broker is back: v1 is announced before anything else
    assert [p.version for p in loop.announced()] == [1]
    assert committed(loop) == manifest(loop, 1)["consumed_offsets"]

    loop.produce(EVERY)
    bus.down = 1
    with pytest.raises(DeliveryError):
        learner.step()
    assert learner.publish().version == 3  # v2 announced first, then a new version
    assert [p.version for p in loop.announced()] == [1, 2, 3]
    assert [v for v, _ in snapshot_versions(loop.root, POLICY)] == [3, 2, 1]
    assert committed(loop) == manifest(loop, 3)["consumed_offsets"]


def test_run_waits_for_the_broker_and_announces_when_it_is_back(loop, caplog):
    bus: FlakyBus = loop.bus  # type: ignore[assignment]
    learner = loop.learner(retry_first_s=0.01, retry_max_s=0.05)
    loop.produce(3 * EVERY)
    bus.down = 5

    def announced_all() -> bool:
        return [p.version for p in loop.announced()] == [1, 2, 3]

    with caplog.at_level(logging.WARNING):
        learner.run(announced_all, max_seconds=60)
    assert announced_all(), loop.announced()
    assert caplog.text.count("waiting for the broker") == 5
    assert 1.0 in bus.waiting_at_flush and waiting() == 0.0
    final = manifest(loop, 3)
    assert final["transitions_applied"] == 3 * EVERY
    assert int(final["service"]["applied_digest"]) == id_digest(
        t.transition_id for t in TRANSITIONS[: 3 * EVERY]
    )
    assert committed(loop) == final["consumed_offsets"]


def test_stopping_during_an_outage_leaves_the_announcement_to_the_next_start(loop):
    bus: FlakyBus = loop.bus  # type: ignore[assignment]
    learner = loop.learner(retry_first_s=0.01, retry_max_s=0.01)
    loop.produce(EVERY)
    bus.down = 10**6
    learner.run(lambda: learner.progress.version == 1 and len(bus.waiting_at_flush) > 3)
    assert loop.announced() == [] and committed(loop) == {}
    assert 1.0 in bus.waiting_at_flush and waiting() == 0.0  # stopped: no longer waiting

    bus.down = 0
    restarted = loop.learner()
    assert restarted.step() == 0
    (announcement,) = loop.announced()
    recorded = loop.storage.snapshot(POLICY, 1)
    assert announcement.version == 1 and recorded is not None
    assert announcement.manifest_sha256 == recorded["manifest_sha256"]


def test_a_fatal_error_still_ends_run(loop):
    bus: FlakyBus = loop.bus  # type: ignore[assignment]
    learner = loop.learner(retry_first_s=0.01)
    loop.produce(EVERY)
    bus.fail_with = RuntimeError("a bug, not the broker")
    with pytest.raises(RuntimeError, match="a bug"):
        learner.run(lambda: False, max_seconds=30)


# -- the catalogue and the sizes (issue 13): no preset, nothing trained on zeros -------------


class CatalogueLoop:
    """A learner's surroundings with a 300-item ``large_catalogue`` world's traffic."""

    def __init__(self, tmp_path: Path, wait_s: float = 5.0) -> None:
        self.settings = Settings(home=tmp_path, catalogue_wait_s=wait_s)
        self.storage = Storage(self.settings.resolved_database_url)
        self.bus = MemoryBus(self.settings.partitions)
        self.world = make_world("large_catalogue", seed=0, n_items=300, dim=8)
        self.transitions = world_transitions(self.world, episodes=3)

    def produce(self, transitions: Sequence[Transition]) -> None:
        for t in transitions:
            self.bus.publish(self.settings.topics.transitions, t.user_id.encode(), codec.encode(t))
        self.bus.flush()

    def learner(self, **kwargs) -> LearnerService:
        config = LearnConfig(algo="mf", policy="mf", snapshot_every_transitions=10**6,
                             snapshot_every_s=math.inf, poll_max=64, poll_timeout_s=0.0)  # fmt: skip
        return LearnerService(self.settings, config, storage=self.storage, bus=self.bus, **kwargs)


def test_without_a_catalogue_the_learner_says_in_one_line_what_to_start(tmp_path):
    loop = CatalogueLoop(tmp_path, wait_s=0.3)
    with pytest.raises(NoCatalogue) as caught:
        loop.learner()
    message = str(caught.value)
    assert "\n" not in message and "within 0 s" in message
    assert "recloop sim" in message and loop.settings.topics.items in message


def test_the_learner_reads_the_catalogue_and_its_sizes_off_the_stream(tmp_path):
    loop = CatalogueLoop(tmp_path)
    catalogue = loop.world.item_catalogue
    publish_catalogue(loop.bus, loop.settings.topics, catalogue)
    outside = msgspec.structs.replace(loop.transitions[0], transition_id="outside",
                                      slate=[1, 2, 3, 4, 300])  # fmt: skip
    loop.produce([outside, *loop.transitions])
    learner = loop.learner()
    assert learner.agent is None and learner.catalogue is not None  # sizes not known yet
    applied = sum(iter(lambda: learner.step(), 0))
    assert applied == len(loop.transitions)
    assert learner.spec == loop.world.spec  # n_items, F from the catalogue; U, K, N the stream's
    assert learner.agent.catalogue.sha256 == catalogue.sha256
    [letter] = loop.bus.records(loop.settings.topics.dlq(loop.settings.topics.transitions))
    assert b"outside" in letter.value
    assert b"item 300 is outside the catalogue [0, 300)" in dict(letter.headers)["recloop.dlq.error"]

    grown = catalogue.extended(np.ones((4, catalogue.feature_dim), np.float32) / 8**0.5)
    publish_catalogue(loop.bus, loop.settings.topics, grown, first=catalogue.n_items)
    learner.step()
    assert learner.agent.catalogue.version == 2 and learner.agent.catalogue.n_items == 304

    published = learner.publish()
    manifest = read_snapshot(learner.snapshots.root / published.path)[1]
    assert manifest["spec"] == loop.world.spec.to_dict()
    assert manifest["catalogue"] == {"version": 2, "n_items": 304, "sha256": grown.sha256}
    learner.close()

    resumed = loop.learner()  # the sizes are the manifest's: the agent exists before any input
    assert resumed.agent is not None and resumed.spec == loop.world.spec
    assert resumed.agent.catalogue.version == 2
    resumed.close()
