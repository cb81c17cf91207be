"""The whole loop on the real broker, as `recloop demo` runs it.

request -> slate -> feedback -> transition -> update -> snapshot -> a slate served by the
new version: every stage is checked on the topics and in storage, not inferred.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from recloop.core.events import PolicyPublished, SlateServed
from recloop.core.settings import Settings
from recloop.core.snapshot import latest_snapshot, read_snapshot
from recloop.kafka.read import end_offsets, read_topic
from recloop.ops.demo import DemoOptions, run_demo
from recloop.storage.store import Storage

pytestmark = pytest.mark.integration


def _records(settings: Settings, topic: str, value_type) -> list:
    return [value for _, _, value in read_topic(settings, topic, value_type)]


def test_a_slate_is_served_by_a_version_that_learned_from_the_loop(
    kafka_settings: Settings, tmp_path, monkeypatch
) -> None:
    # A relative output folder, as `make demo` uses (artifacts/demo): every process must find
    # the snapshots the learner announces.
    monkeypatch.chdir(tmp_path)
    options = DemoOptions(
        duration_s=100, algo="slateq", users=24, rate=60, snapshot_every=200,
        snapshot_seconds=3.0, out_dir=Path("demo"), window_s=5.0,
    )  # fmt: skip
    summary = run_demo(kafka_settings, options, Console(file=io.StringIO()))
    run = kafka_settings.model_copy(update={
        "topic_prefix": summary["topic_prefix"], "snapshot_dir": Path(summary["snapshot_dir"]),
        "database_url": summary["database_url"],
    })
    # The run kept its own database in its folder (not the one under home), so a second run
    # can number its snapshots from v1 again.
    assert summary["database_url"].endswith(f"/demo/{summary['run_id']}/recloop.db")
    topics = run.topics

    # Every stage of the loop carried records, and the simulator kept to the demo's rate
    # (one second of burst allowed, and a margin for retried requests).
    for topic in (topics.requests, topics.slates, topics.feedback, topics.transitions):
        assert end_offsets(run, topic) > 0, topic
    assert end_offsets(run, topics.requests) <= options.rate * (options.duration_s + 1) * 1.05

    # The learner published versions that learned from transitions, recorded and announced.
    ref = latest_snapshot(run.resolved_snapshot_dir, "slateq")
    assert ref is not None and ref.version >= 1
    _, manifest = read_snapshot(ref.path, ref.weights_sha256, ref.manifest_sha256)
    assert manifest["transitions_applied"] > 0
    announced = _records(run, topics.snapshots, PolicyPublished)
    assert {p.version for p in announced} >= {1, ref.version}
    with Storage.from_settings(run) as storage:
        assert storage.latest_snapshot("slateq")["version"] == ref.version
        assert storage.outcome_series(summary["run_id"]), "the monitor recorded outcomes"

    # Serving answered with a learned version after it was published, never going backwards.
    slates = _records(run, topics.slates, SlateServed)
    learned = [s for s in slates if s.policy == "slateq" and s.policy_version >= 1]
    assert learned, "no slate was served by a learned version"
    # Serving installs the newest announced version, so one announced right behind another
    # may never be served: check the first learned version that was.
    first_version = min(s.policy_version for s in learned)
    first_served = min(s.ts for s in learned if s.policy_version == first_version)
    published = next(p for p in announced if p.version == first_version)
    assert first_served >= published.created_ts
    by_user: dict[str, list[SlateServed]] = {}
    for s in sorted(slates, key=lambda s: s.ts):
        if s.policy == "slateq":
            by_user.setdefault(s.user_id, []).append(s)
    for seq in by_user.values():
        versions = [s.policy_version for s in seq]
        assert versions == sorted(versions), "a user saw an older version after a newer one"
    # The control arm stayed random throughout.
    assert {s.policy_version for s in slates if s.policy == "random"} == {0}
