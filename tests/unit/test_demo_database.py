"""A demo run is a deployment of its own: it refuses a database that already holds versions."""

from __future__ import annotations

import pytest

from recloop.core.settings import Settings
from recloop.ops.demo import DemoError, DemoOptions, run_demo
from recloop.storage.store import Storage


def _snapshot_meta(policy: str, version: int) -> dict:
    return {
        "policy": policy, "algorithm": policy, "version": version, "created_ts": 1.0,
        "weights_sha256": "a" * 64, "manifest_sha256": "b" * 64, "path": "x",
        "manifest": {}, "consumed_offsets": {}, "transitions_applied": 0, "metrics": {},
    }  # fmt: skip


def test_a_database_with_snapshots_of_the_policy_is_refused_before_anything_starts(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with Storage(url) as storage:
        storage.record_snapshot(_snapshot_meta("slateq", 12))
    # Port 1: were the demo to go on and look for a broker, it would fail differently.
    settings = Settings(kafka_bootstrap="127.0.0.1:1", database_url=url, home=tmp_path)
    options = DemoOptions(algo="slateq", duration_s=5, out_dir=tmp_path / "demo")
    with pytest.raises(DemoError, match=r"already records slateq snapshots \(up to v12\)"):
        run_demo(settings, options)
