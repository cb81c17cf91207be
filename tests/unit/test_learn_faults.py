"""The learner rides out a broker outage while publishing (issue 11, item 2).

``FlakyBus`` is a ``MemoryBus`` whose broker is away for the next ``down`` flushes: each
raises ``DeliveryError`` (as ``KafkaBus.flush`` does) and loses what was published since the
last flush, so an announcement is on the topic only once a flush acknowledged it. The
learner is driven through its public ``step``, ``publish`` and ``run``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from recloop.core.membus import MemoryBus
from recloop.core.snapshot import read_snapshot, snapshot_versions
from recloop.kafka.clients import DeliveryError
from recloop.learner.publishing import id_digest
from tests.unit.test_snapshot_faults import EVERY, POLICY, TRANSITIONS, Loop


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
    return Loop(tmp_path, FlakyBus())


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
