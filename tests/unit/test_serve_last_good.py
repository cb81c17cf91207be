"""Serving keeps the last good version when a newer announcement is refused (issue 11, item 4).

Real snapshot files (``core.snapshot.write_snapshot``), the real ``SnapshotInstaller`` and
``PolicyHost``, announcements through ``services.serve_installs.Installs`` as the serve
process hands them on; damage is bytes flipped in the weights after the announcement.
Announcements are signed with a snapshot key as in a deployment, so a damaged one is still
the learner's newest version (``recloop_serving_behind_newest`` counts it).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from recloop.core.events import PolicyPublished
from recloop.core.snapshot import WEIGHTS_FILE, announced_path, describe_snapshot, snapshot_dir
from recloop.core.snapshot_auth import sign
from recloop.services.serve_installs import KEEP, Installs
from recloop.serving.host import PolicyHost
from recloop.serving.server import ServeConfig, SlateServer
from recloop.serving.snapshots import InstallResult, SnapshotInstaller
from recloop.serving.split import TrafficSplit
from tests.unit.test_serving_snapshots import (
    CATALOGUE,
    N_ITEMS,
    load_score_policy,
    publish,
    request,
)

KEY = "test-snapshot-key"


class Served:
    """One server's host, installer, pending announcements and slate server for ``policy``."""

    def __init__(self, root: Path, policy: str) -> None:
        self.root, self.policy = root, policy
        self.host = PolicyHost([policy])
        self.installer = SnapshotInstaller(self.host, load_score_policy, root,
                                           key=SecretStr(KEY))  # fmt: skip
        self.results: deque[InstallResult] = deque()
        self.errors: deque[str] = deque()
        self.installs = Installs(self.installer, self.results, self.errors)
        config = ServeConfig(TrafficSplit.parse([policy]))
        self.server = SlateServer(config, self.host, catalogue=CATALOGUE)

    def snapshot(self, version: int, *, damaged: bool = False) -> PolicyPublished:
        """Write and announce ``version``; its top item is ``version % N_ITEMS``."""
        scores_I = np.zeros(N_ITEMS)
        scores_I[version % N_ITEMS] = 1.0
        published = publish(self.root, version, scores_I, policy=self.policy, key=KEY)
        if damaged:
            weights = snapshot_dir(self.root, self.policy, version) / WEIGHTS_FILE
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0xFF
            weights.write_bytes(bytes(data))
        self.installs.announce(published)
        return published

    def served(self) -> tuple[int, int]:
        """(version, top item) of the slate the server answers now."""
        slate = self.server.serve_batch([request(0)])[0]
        assert slate.policy == self.policy
        return slate.policy_version, slate.items[0]

    def refused(self) -> float:
        labels = {"process": "serve", "policy": self.policy}
        return REGISTRY.get_sample_value("recloop_snapshots_refused_total", labels) or 0.0

    def behind(self) -> float | None:
        labels = {"policy": self.policy}
        return REGISTRY.get_sample_value("recloop_serving_behind_newest", labels)


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Served:
    # A policy name per test: the Prometheus counters are process-wide.
    return Served(tmp_path, request.node.name[:100])


def test_both_announced_before_the_first_install_serves_the_valid_older_one(served):
    served.snapshot(1)
    served.snapshot(2, damaged=True)
    served.installs.install_pending()

    assert served.host.version(served.policy) == 1
    assert served.served() == (1, 1)  # not the uniform fallback at version 0
    assert [(r.status, r.version) for r in served.results] == [("refused", 2), ("swapped", 1)]
    assert served.refused() == 1
    assert served.behind() == 1


def test_serving_v1_keeps_v1_when_v2_is_refused_and_takes_v3(served):
    served.snapshot(1)
    served.installs.install_pending()
    served.snapshot(2, damaged=True)
    served.installs.install_pending()
    assert served.served() == (1, 1)
    assert served.refused() == 1 and served.behind() == 1

    served.snapshot(3)
    served.installs.install_pending()
    assert served.served() == (3, 3)
    assert served.behind() == 0


def test_the_newest_good_one_above_what_serves_wins(served):
    served.snapshot(1)
    served.installs.install_pending()
    served.snapshot(2)
    served.snapshot(3, damaged=True)
    served.installs.install_pending()

    assert served.served() == (2, 2)
    assert [(r.status, r.version) for r in served.results][1:] == [("refused", 3), ("swapped", 2)]
    assert served.behind() == 1


def test_older_announcements_are_not_tried_once_one_swaps(served):
    for version in (1, 2, 3):
        served.snapshot(version)
    served.installs.install_pending()
    assert served.served() == (3, 3)
    assert [(r.status, r.version) for r in served.results] == [("swapped", 3)]

    # A repeat of an older announcement (the learner re-announces the one it resumed from).
    served.installs.announce(_again(served, 2))
    served.installs.install_pending()
    assert served.results[-1].status == "stale" and served.served() == (3, 3)
    assert served.behind() == 0


def _again(served: Served, version: int) -> PolicyPublished:
    """The announcement of a snapshot already on disk, as the learner sends it again."""
    ref = describe_snapshot(snapshot_dir(served.root, served.policy, version))
    return sign(PolicyPublished(
        policy=served.policy, algorithm="score", version=version,
        path=announced_path(served.root, ref.path), weights_sha256=ref.weights_sha256,
        manifest_sha256=ref.manifest_sha256, created_ts=ref.created_ts,
    ), KEY)  # fmt: skip


def test_all_refused_leaves_what_serves_and_the_kept_set_is_bounded(served):
    served.snapshot(1)
    served.installs.install_pending()
    for version in range(2, 2 + KEEP + 5):
        served.snapshot(version, damaged=True)
    served.installs.install_pending()

    assert served.served() == (1, 1)
    assert served.refused() == KEEP  # the oldest five were dropped untried
    assert served.behind() == KEEP + 5
    assert not served.errors
