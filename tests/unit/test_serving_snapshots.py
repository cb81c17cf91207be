"""Swaps never go backwards; tampered or unloadable snapshots are refused while serving goes on."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import PolicyPublished, RecRequest
from recloop.core.ports import Slate
from recloop.core.snapshot import WEIGHTS_FILE, announced_path, write_snapshot
from recloop.core.snapshot_auth import sign
from recloop.serving.host import PolicyHost, StaleVersionError
from recloop.serving.server import ServeConfig, SlateServer
from recloop.serving.snapshots import SnapshotInstaller
from recloop.serving.split import TrafficSplit

N_ITEMS = 8
CATALOGUE = ItemCatalogue(np.zeros((N_ITEMS, 0), np.float32))
"""Items known by id only: the score policy needs no features."""


class ScorePolicy:
    """Test policy: a fixed score per item id (the snapshot's only tensor), top-K."""

    name = "scored"

    def __init__(self, scores_I: np.ndarray) -> None:
        self.scores_I = scores_I

    def recommend(self, observation, candidates, k):
        scores_N = self.scores_I[candidates.ids]
        top_K = np.argsort(-scores_N, kind="stable")[:k]
        return Slate(candidates.ids[top_K], scores_N[top_K], np.ones(k))


def load_score_policy(algorithm, tensors, manifest):
    assert algorithm == "score"
    return ScorePolicy(tensors["scores_I"])


def publish(root, version: int, scores_I: np.ndarray, policy: str = "learned",
            key: str | None = None) -> PolicyPublished:  # fmt: skip
    """Write ``version`` under ``root`` and return its announcement, as the learner makes it
    (named relative to the root, signed when there is a ``key``)."""
    manifest = {"algorithm": "score", "config": {}, "metrics": {}, "consumed_offsets": {},
                "transitions_applied": 0}  # fmt: skip
    ref = write_snapshot(root, policy, version, {"scores_I": scores_I}, manifest)
    return sign(PolicyPublished(
        policy=policy, algorithm="score", version=version, path=announced_path(root, ref.path),
        weights_sha256=ref.weights_sha256, manifest_sha256=ref.manifest_sha256,
        created_ts=ref.created_ts,
    ), key)  # fmt: skip


def request(i: int) -> RecRequest:
    return RecRequest(request_id=f"r{i}", user_id=f"u{i}", session_id="s", step=0, ts=1.0, k=2,
                      candidates=list(range(N_ITEMS)))  # fmt: skip


@pytest.fixture
def served(tmp_path):
    host = PolicyHost(["learned"])
    installer = SnapshotInstaller(host, load_score_policy, tmp_path)
    server = SlateServer(ServeConfig(TrafficSplit.parse(["learned"])), host, catalogue=CATALOGUE)
    return host, installer, server


def test_swap_refuses_older_or_equal_versions():
    host = PolicyHost(["p"])
    host.swap("p", 3, ScorePolicy(np.zeros(2)))
    for stale in (3, 2, 0):
        with pytest.raises(StaleVersionError):
            host.swap("p", stale, ScorePolicy(np.zeros(2)))
    assert host.version("p") == 3
    host.swap("p", 4, ScorePolicy(np.zeros(2)))
    assert host.version("p") == 4 and host.refused_stale == 3
    with pytest.raises(KeyError):
        host.swap("other", 9, ScorePolicy(np.zeros(2)))


def test_fallback_before_snapshot_then_the_snapshot(served, tmp_path):
    host, installer, server = served
    before = server.serve_batch([request(0)])[0]
    assert (before.policy, before.policy_version) == ("learned", 0)  # the arm, served by its fallback
    assert before.propensities == [2 / N_ITEMS, 2 / N_ITEMS]

    scores_I = np.arange(N_ITEMS, dtype=np.float64)
    assert installer.install(publish(tmp_path, 1, scores_I)).status == "swapped"
    after = server.serve_batch([request(1)])[0]
    assert (after.policy, after.policy_version) == ("learned", 1)
    assert after.items == [7, 6] and after.propensities == [1.0, 1.0]


def test_tampered_snapshot_refused_and_serving_continues(served, tmp_path):
    host, installer, server = served
    assert (
        installer.install(publish(tmp_path, 1, np.arange(N_ITEMS, dtype=np.float64))).status
        == "swapped"
    )

    tampered = publish(tmp_path, 2, -np.arange(N_ITEMS, dtype=np.float64))
    weights = tmp_path / "learned" / "v00000002" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bits inside the tensor data
    weights.write_bytes(bytes(data))
    result = installer.install(tampered)
    assert result.status == "refused" and "SHA-256" in result.reason

    slate = server.serve_batch([request(2)])[0]
    assert (slate.policy, slate.policy_version, slate.items) == ("learned", 1, [7, 6])
    assert installer.counts["refused"] == 1


def test_announcement_with_wrong_hash_or_missing_files_is_refused(served, tmp_path):
    host, installer, _ = served
    good = publish(tmp_path, 1, np.ones(N_ITEMS))
    lying = PolicyPublished(**{**_fields(good), "manifest_sha256": "0" * 64})
    assert installer.install(lying).status == "refused"
    missing = PolicyPublished(**{**_fields(good), "path": str(tmp_path / "nowhere")})
    assert installer.install(missing).status == "refused"
    assert host.version("learned") is None
    assert installer.install(good).status == "swapped"


def test_unloadable_snapshot_is_refused(served, tmp_path):
    host, _, _ = served

    def broken_loader(algorithm, tensors, manifest):
        raise RuntimeError("shape mismatch")

    installer = SnapshotInstaller(host, broken_loader, tmp_path)
    result = installer.install(publish(tmp_path, 1, np.ones(N_ITEMS)))
    assert result.status == "refused" and "shape mismatch" in result.reason
    assert host.version("learned") is None


def test_stale_and_foreign_announcements(served, tmp_path):
    host, installer, _ = served
    v2 = publish(tmp_path, 2, np.ones(N_ITEMS))
    v1 = publish(tmp_path, 1, np.ones(N_ITEMS))
    assert installer.install(v2).status == "swapped"
    assert installer.install(v1).status == "stale"
    assert (
        installer.install(publish(tmp_path, 5, np.ones(N_ITEMS), policy="other")).status
        == "ignored"
    )
    assert host.version("learned") == 2


def test_a_failing_policy_is_answered_by_the_fallback(served):
    host, _, server = served

    class Broken:
        name = "broken"

        def recommend(self, observation, candidates, k):
            return Slate(np.array([1, 1]), np.zeros(2), np.ones(2))  # duplicate items

    host.swap("learned", 1, Broken())
    slate = server.serve_batch([request(3)])[0]
    assert (slate.policy, slate.policy_version) == ("uniform", 0)
    assert server.stats["policy_errors"] == 1 and "distinct" in server.last_error


def _fields(record: PolicyPublished) -> dict:
    return {f: getattr(record, f) for f in record.__struct_fields__}
