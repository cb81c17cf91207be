"""Where the learner's snapshots go: files and a storage row, or (in process) nowhere.

``Snapshots.latest`` gives the tensors and manifest to resume from; ``write`` persists a
version and returns its announcement for ``policy.snapshots``. ``DiskSnapshots`` writes
``weights.safetensors`` + ``manifest.json`` atomically (``recloop.core.snapshot``), the
dedupe window's ids as one more tensor, and records the snapshot in storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recloop.core.events import PolicyPublished
from recloop.core.snapshot import announced_path, latest_snapshot, read_snapshot, write_snapshot
from recloop.learner import publishing


class Snapshots(Protocol):
    """Where the learner's snapshots go: ``latest`` to resume from, ``write`` to publish."""

    def latest(self, policy: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None: ...

    def write(self, policy: str, version: int, agent: Any, ids: list[str],
              manifest: dict[str, Any]) -> PolicyPublished: ...  # fmt: skip


class DiskSnapshots:
    """Snapshots as files under ``root`` (``recloop.core.snapshot``), recorded in storage."""

    def __init__(self, root: Path, storage: Any) -> None:
        self.root, self.storage = root, storage
        self.last_ref: Any = None

    def latest(self, policy: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        ref = latest_snapshot(self.root, policy)
        if ref is None:
            return None
        tensors, manifest = read_snapshot(ref.path, ref.weights_sha256, ref.manifest_sha256)
        # A crash between writing and recording leaves the row missing: record it again.
        self.storage.record_snapshot(ref.meta())
        return tensors, manifest

    def write(self, policy: str, version: int, agent: Any, ids: list[str],
              manifest: dict[str, Any]) -> PolicyPublished:  # fmt: skip
        tensors = dict(agent.state_tensors())
        tensors[publishing.APPLIED_IDS_KEY] = publishing.pack_ids(ids)
        ref = write_snapshot(self.root, policy, version, tensors, manifest)
        self.storage.record_snapshot(ref.meta())
        self.last_ref = ref
        return PolicyPublished(
            policy=policy, algorithm=manifest["algorithm"], version=version,
            path=announced_path(self.root, ref.path), weights_sha256=ref.weights_sha256,
            manifest_sha256=ref.manifest_sha256, created_ts=ref.created_ts,
            transitions_applied=manifest["transitions_applied"], metrics=manifest["metrics"],
        )  # fmt: skip
