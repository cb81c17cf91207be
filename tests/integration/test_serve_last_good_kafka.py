"""``recloop serve`` on the real broker keeps the last good version (issue 11, item 4).

The operator's case: serving (re)starts and reads ``policy.snapshots`` from the beginning,
where the newest announcement names a damaged snapshot. It must serve the valid one before
it, not the uniform fallback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recloop.core.settings import Settings
from recloop.core.snapshot import WEIGHTS_FILE
from tests.integration.test_serve_kafka import (
    Client,
    _config,
    _wait_version,
    request,
    running_service,
    scores_of,
    snapshot,
    top_items_of,
)

pytestmark = pytest.mark.integration


def test_a_restart_with_the_newest_snapshot_damaged_serves_the_one_before(
    kafka_settings: Settings, tmp_path: Path
):
    client = Client(kafka_settings)
    client.announce(snapshot(tmp_path, 1, scores_of(1)))
    damaged = snapshot(tmp_path, 2, scores_of(2))
    weights = tmp_path / "snapshots" / damaged.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    client.announce(damaged)
    client.flush()

    with running_service(kafka_settings, _config()) as service:
        _wait_version(service, 1)
        for i in range(10):
            client.send_request(request(i))
        client.flush()
        slates = client.read_slates(10)
        assert service.installer.counts["refused"] == 1

        client.announce(snapshot(tmp_path, 3, scores_of(3)))
        client.flush()
        _wait_version(service, 3)
    client.close()

    assert {(s.policy, s.policy_version) for s in slates} == {("learned", 1)}
    assert all(s.items == top_items_of(1) for s in slates)
