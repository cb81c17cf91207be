"""From a ``PolicyPublished`` announcement to a swapped-in policy, or a counted refusal.

``SnapshotInstaller.install`` reads the snapshot with ``recloop.core.snapshot.read_snapshot``,
checking both files against the SHA-256 the announcement carries, checks the manifest names
the announced policy and version, builds the policy with the injected loader (serving never
imports the learner) and, if the policy has item embeddings, the faiss index; only then does
it swap. Anything that fails leaves the current policy serving and is counted by reason;
``services.serve_installs`` then tries the newest older announcement above what serves.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recloop.core.events import PolicyPublished
from recloop.core.ports import SlatePolicy
from recloop.core.snapshot import SnapshotError, read_snapshot, resolve_announced
from recloop.serving.host import PolicyHost, StaleVersionError
from recloop.serving.retrieval import CatalogueIndex

PolicyLoader = Callable[[str, dict[str, np.ndarray], dict[str, Any]], SlatePolicy]
"""``loader(algorithm, tensors, manifest) -> policy``; the wiring supplies it."""


@dataclass(frozen=True)
class InstallResult:
    """What became of one announcement."""

    status: str  # "swapped", "stale", "ignored" or "refused"
    policy: str
    version: int
    reason: str = ""
    seconds: float = 0.0


class SnapshotInstaller:
    """Installs announced snapshots into a ``PolicyHost``; counts outcomes in ``counts``."""

    def __init__(
        self,
        host: PolicyHost,
        loader: PolicyLoader,
        snapshot_root: Path | None = None,
        index_kind: str = "auto",
    ) -> None:
        self.host = host
        self.loader = loader
        self.snapshot_root = Path(snapshot_root) if snapshot_root is not None else None
        self.index_kind = index_kind
        self.counts: Counter[str] = Counter()
        self.last_refusal = ""

    def resolve(self, path: str) -> Path:
        """An announced path: absolute as given, relative ones under the snapshot root."""
        return resolve_announced(self.snapshot_root, path)

    def install(self, published: PolicyPublished) -> InstallResult:
        t0 = time.perf_counter()
        result = self._install(published)
        result = InstallResult(
            result.status, result.policy, result.version, result.reason, time.perf_counter() - t0
        )
        self.counts[result.status] += 1
        if result.status == "refused":
            self.last_refusal = result.reason
        return result

    def _install(self, published: PolicyPublished) -> InstallResult:
        name, version = published.policy, published.version
        if not self.host.hosts(name):
            return InstallResult("ignored", name, version, "not a policy this server serves")
        current = self.host.version(name)
        if current is not None and version <= current:
            return InstallResult("stale", name, version, f"serving version {current} already")
        try:
            tensors, manifest = read_snapshot(
                self.resolve(published.path),
                expected_weights_sha256=published.weights_sha256,
                expected_manifest_sha256=published.manifest_sha256,
            )
        except SnapshotError as exc:
            return InstallResult("refused", name, version, f"snapshot: {exc}")
        if manifest.get("policy") != name or manifest.get("version") != version:
            reason = (
                f"manifest says {manifest.get('policy')!r} v{manifest.get('version')}, "
                f"the announcement {name!r} v{version}"
            )
            return InstallResult("refused", name, version, reason)
        try:
            policy = self.loader(published.algorithm, tensors, manifest)
            index = self._index_for(policy)
        except Exception as exc:  # a loader or an index build may fail in many ways
            return InstallResult("refused", name, version, f"load: {type(exc).__name__}: {exc}")
        try:
            self.host.swap(name, version, policy, algorithm=published.algorithm, index=index)
        except StaleVersionError as exc:
            return InstallResult("stale", name, version, str(exc))
        return InstallResult("swapped", name, version)

    def _index_for(self, policy: SlatePolicy) -> CatalogueIndex | None:
        embeddings = getattr(policy, "item_embeddings", None)
        embeddings_ND = embeddings() if callable(embeddings) else None
        if embeddings_ND is None:
            return None
        return CatalogueIndex(np.asarray(embeddings_ND), kind=self.index_kind)
