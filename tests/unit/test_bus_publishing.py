"""The learner's pure bookkeeping: dedupe window, digest, schedule, manifest."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recloop.learner import publishing
from recloop.learner.publishing import DedupeWindow, Progress, PublishSchedule, id_digest


def test_the_digest_ignores_order_and_sees_duplicates_and_gaps() -> None:
    ids = [f"t{i}" for i in range(10)]
    assert id_digest(ids) == id_digest(reversed(ids))
    assert id_digest(ids + ["t3"]) != id_digest(ids)
    assert id_digest(ids[:-1]) != id_digest(ids)
    assert id_digest(ids[5:], id_digest(ids[:5])) == id_digest(ids)


def test_the_window_drops_repeats_and_forgets_the_oldest() -> None:
    window = DedupeWindow(3)
    assert window.fresh(["a", "b", "a", "c"]) == [True, True, False, True]
    assert window.fresh(["d"]) == [True]  # "a" falls out of the window
    assert "a" not in window and "b" in window and len(window) == 3
    assert window.fresh(["a"]) == [True]
    with pytest.raises(ValueError):
        DedupeWindow(0)


def test_ids_pack_into_a_tensor_and_back() -> None:
    ids = ["x1", "y22", "z"]
    packed = publishing.pack_ids(ids)
    assert packed.dtype == np.uint8
    assert publishing.unpack_ids(packed) == ids
    assert publishing.unpack_ids(publishing.pack_ids([])) == []


def test_the_schedule_publishes_on_count_or_on_time_with_something_new() -> None:
    schedule = PublishSchedule(every_transitions=100, every_s=5.0)
    assert schedule.due(100, 0.0)
    assert not schedule.due(99, 4.9)
    assert schedule.due(1, 5.0)
    assert not schedule.due(0, 1e9)


def test_the_manifest_records_progress_and_round_trips() -> None:
    progress = Progress(version=2)
    progress.consumed("rec.transitions", 1, 41)
    progress.applied(["a", "b"], newest_ts=12.5)
    progress.duplicates_dropped = 3
    manifest = publishing.compose_manifest(
        "mf", {"lr": 0.1}, {"n_items": 5}, {"loss": 0.5, "bad": math.nan}, progress, seed=7
    )
    assert manifest["metrics"] == {"loss": 0.5}
    assert manifest["consumed_offsets"] == {"rec.transitions": {"1": 42}}
    assert manifest["transitions_applied"] == 2
    assert manifest["service"] == {
        "applied_digest": str(id_digest(["a", "b"])), "duplicates_dropped": 3,
        "newest_event_ts": 12.5, "seed": 7,
    }  # fmt: skip
    back = publishing.progress_from_manifest({**manifest, "version": 2})
    assert back == progress
    assert back.start_offset("rec.transitions", 1) == 42
    assert back.start_offset("rec.transitions", 0) is None
