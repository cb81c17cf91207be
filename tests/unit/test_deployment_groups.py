"""Every consumer group a deployment's processes join is named under its topic prefix.

Two deployments on one broker (two prefixes) must never share a group: serving's group used
to be a bare ``recloop-serve``, so a second deployment's servers joined the first one's
group, took some of its partitions of *their own* request topic and stalled its rebalances.
"""

from __future__ import annotations

from typing import Any

import pytest

from recloop import inprocess
from recloop.core.membus import MemoryBus
from recloop.core.settings import Settings
from recloop.learner import registry
from recloop.producer_sim.presets import tiny_world

PREFIX = "deployment-a."


GROUPS: list[str] = []


class RecordingBus(MemoryBus):
    """A ``MemoryBus`` that remembers the group of every subscription."""

    def subscribe(self, topics: Any, group: str, **kwargs: Any) -> Any:
        GROUPS.append(group)
        return super().subscribe(topics, group, **kwargs)


def test_every_service_joins_groups_under_the_deployment_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECLOOP_TOPIC_PREFIX", PREFIX)
    monkeypatch.setattr(inprocess, "MemoryBus", RecordingBus)
    GROUPS.clear()
    world = tiny_world(seed=0)
    agent = registry.make_agent("mf", inprocess.spec_for(world), 0)
    loop = inprocess.build_loop(world, {"mf": agent}, episodes=4, seed=0)
    for _ in range(20):  # serving subscribes its request and side readers on its first round
        loop.round()
    groups = list(GROUPS)
    kinds = {g.removeprefix(PREFIX).split("-")[1] for g in groups if g.startswith(PREFIX)}
    assert {"sim", "serve", "streams", "learner"} <= kinds, groups
    outside = [g for g in groups if not g.startswith(PREFIX)]
    assert not outside, f"groups outside the deployment prefix {PREFIX!r}: {outside}"


def test_the_streams_worker_app_id_defaults_under_the_prefix() -> None:
    from recloop.cli.streams import default_app_id

    assert default_app_id(Settings(topic_prefix=PREFIX)) == f"{PREFIX}recloop-streams"
    assert default_app_id(Settings()) == "recloop-streams"
