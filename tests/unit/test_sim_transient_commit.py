"""The simulator rides out a commit that fails for a transient reason.

During a broker outage the sim's commit of ``rec.slates`` raised ``KafkaException: Commit
failed: Waiting for coordinator`` out of ``SimService.step`` and the simulator died. Now the
failure is counted, the positions are kept, and the next commit commits them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from recloop import inprocess
from recloop.core.membus import MemoryBus, MemoryConsumer
from recloop.learner import registry
from recloop.producer_sim.presets import tiny_world

FAILURES = 3


class FlakyCommits(MemoryConsumer):
    failures_left = FAILURES

    def commit(self, positions: Any) -> None:
        if FlakyCommits.failures_left > 0:
            FlakyCommits.failures_left -= 1
            raise KafkaException(KafkaError(KafkaError._WAIT_COORD, "Waiting for coordinator"))
        super().commit(positions)


class CoordinatorAwayBus(MemoryBus):
    """The simulator's commits fail ``FAILURES`` times, as while the broker is away."""

    def subscribe(self, topics: Any, group: str, **kwargs: Any) -> Any:
        consumer = super().subscribe(topics, group, **kwargs)
        if "recloop-sim" in group:
            consumer.__class__ = FlakyCommits
        return consumer


def test_the_simulator_counts_a_failed_commit_and_commits_later(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(inprocess, "MemoryBus", CoordinatorAwayBus)
    FlakyCommits.failures_left = FAILURES
    world = tiny_world(seed=0)
    agent = registry.make_agent("mf", inprocess.spec_for(world), 0)
    loop = inprocess.build_loop(world, {"mf": agent}, episodes=10**6, seed=0)
    sim = loop.sim
    deadline = time.monotonic() + 30
    while FlakyCommits.failures_left > 0 or not _sim_committed(loop.bus):
        assert time.monotonic() < deadline, (sim.stats, loop.bus.committed)
        loop.round()  # raised out of the simulator's step on the old code
    assert sim.stats.commit_errors == FAILURES
    assert "Waiting for coordinator" in sim.stats.last_error
    # The positions of the failed commits were kept: everything read is committed now.
    committed = _sim_committed(loop.bus)
    for (topic, partition), offset in committed.items():
        assert offset <= loop.bus.end(topic, partition)
    assert sum(committed.values()) > 0


def _sim_committed(bus: MemoryBus) -> dict[tuple[str, int], int]:
    for group, positions in bus.committed.items():
        if "recloop-sim" in group and any(positions.values()):
            return positions
    return {}
