"""Where the learner's snapshots go: files and a storage row, or (in process) nowhere.

``Snapshots.latest`` gives what to resume from; ``write`` persists a version and returns its
announcement for ``policy.snapshots``. ``DiskSnapshots`` writes ``weights.safetensors`` +
``manifest.json`` atomically (``recloop.core.snapshot``), the dedupe window's ids as one more
tensor, and records the snapshot in storage.

Resuming trusts nothing on disk. The newest ``v*`` directory is verified: its weights against
its manifest's ``weights_sha256``, and both files against storage's record of that version
when there is one (so a manifest edited into other valid JSON is refused for not being the
one recorded); its manifest must name the policy and version of its directory and say what
the learner needs to resume. A snapshot that fails is logged, counted in
``recloop_snapshots_refused_total{process="learner"}`` and left where it is, and the next
older one is tried. A verified snapshot storage does not know (a crash between writing and
recording) is recorded then.

Each announcement is signed with the snapshot key when one is configured
(``recloop.core.snapshot_auth``): serving and the monitor then refuse any announcement the
learner did not make. Its path is always relative to the root (``<policy>/v<version>``).

Versions are never re-used: ``write`` takes the version it is asked for or, if that is not
above every version known anywhere (each ``v*`` directory, valid or not; storage's highest
record; what this object wrote), the next one above them all. So falling back to an older
snapshot, or moving a bad directory aside, never makes the learner publish a number storage
or serving has already seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import SecretStr

from recloop import metrics
from recloop.core import snapshot_auth
from recloop.core.events import PolicyPublished
from recloop.core.snapshot import (
    DEFAULT_MAX_WEIGHTS_BYTES,
    SnapshotError,
    SnapshotRef,
    announced_path,
    describe_snapshot,
    read_snapshot,
    snapshot_versions,
    write_snapshot,
)
from recloop.learner import publishing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resumed:
    """A verified snapshot to resume from, and its announcement (sent again on resume)."""

    tensors: dict[str, np.ndarray]
    manifest: dict[str, Any]
    announcement: PolicyPublished


class Snapshots(Protocol):
    """Where the learner's snapshots go: ``latest`` to resume from, ``write`` to publish.

    ``write`` may give a higher version than the one asked for (see the module docstring);
    the announcement it returns says which.
    """

    def latest(self, policy: str) -> Resumed | None: ...

    def write(self, policy: str, version: int, agent: Any, ids: list[str],
              manifest: dict[str, Any]) -> PolicyPublished: ...  # fmt: skip


class DiskSnapshots:
    """Snapshots as files under ``root`` (``recloop.core.snapshot``), recorded in storage;
    announcements signed with ``key`` when there is one."""

    def __init__(self, root: Path, storage: Any, key: SecretStr | None = None,
                 max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES) -> None:  # fmt: skip
        self.root, self.storage = root, storage
        self._key, self.max_weights_bytes = key, max_weights_bytes
        self._written: dict[str, int] = {}

    def latest(self, policy: str) -> Resumed | None:
        """The newest snapshot of ``policy`` that verifies; older ones are tried in turn."""
        for version, path in snapshot_versions(self.root, policy):
            try:
                return self._verified(policy, version, path)
            except SnapshotError as exc:
                metrics.SNAPSHOTS_REFUSED.labels("learner", policy).inc()
                log.warning("refused snapshot %s v%d, trying the one before: %s",
                            policy, version, exc)  # fmt: skip
        return None

    def write(self, policy: str, version: int, agent: Any, ids: list[str],
              manifest: dict[str, Any]) -> PolicyPublished:  # fmt: skip
        version = max(version, self.highest_version(policy) + 1)
        tensors = dict(agent.state_tensors())
        tensors[publishing.APPLIED_IDS_KEY] = publishing.pack_ids(ids)
        ref = write_snapshot(self.root, policy, version, tensors, manifest)
        self._written[policy] = version
        self.storage.record_snapshot(ref.meta())
        return self._announcement(ref)

    def highest_version(self, policy: str) -> int:
        """The highest version of ``policy`` known on disk, in storage or written here."""
        on_disk = snapshot_versions(self.root, policy)
        recorded = self.storage.latest_snapshot(policy)
        return max(
            on_disk[0][0] if on_disk else 0,
            int(recorded["version"]) if recorded is not None else 0,
            self._written.get(policy, 0),
        )

    def _verified(self, policy: str, version: int, path: Path) -> Resumed:
        ref = describe_snapshot(path)
        if (ref.policy, ref.version) != (policy, version):
            raise SnapshotError(f"{path}: the manifest says {ref.policy!r} v{ref.version}")
        record = self.storage.snapshot(policy, version)
        if record is not None and record["manifest_sha256"] != ref.manifest_sha256:
            raise SnapshotError(
                f"{path}: manifest SHA-256 {ref.manifest_sha256} != recorded "
                f"{record['manifest_sha256']}"
            )
        expected_weights = ref.weights_sha256 if record is None else record["weights_sha256"]
        tensors, manifest = read_snapshot(path, expected_weights, ref.manifest_sha256,
                                          self.max_weights_bytes)  # fmt: skip
        try:
            publishing.progress_from_manifest(manifest)
            publishing.unpack_ids(tensors.get(publishing.APPLIED_IDS_KEY, np.zeros(0, np.uint8)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(f"{path}: not a learner snapshot: {exc!r}") from exc
        if record is None:
            # A crash between writing and recording leaves the row missing: record it now.
            self.storage.record_snapshot(ref.meta())
        return Resumed(tensors, manifest, self._announcement(ref))

    def _announcement(self, ref: SnapshotRef) -> PolicyPublished:
        manifest = ref.manifest
        published = PolicyPublished(
            policy=ref.policy, algorithm=ref.algorithm, version=ref.version,
            path=announced_path(self.root, ref.path), weights_sha256=ref.weights_sha256,
            manifest_sha256=ref.manifest_sha256, created_ts=ref.created_ts,
            transitions_applied=manifest["transitions_applied"], metrics=manifest["metrics"],
        )  # fmt: skip
        return snapshot_auth.sign(published, self._key)
