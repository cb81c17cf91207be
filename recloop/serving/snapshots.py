"""From a ``PolicyPublished`` announcement to a swapped-in policy, or a counted refusal.

``SnapshotInstaller.admit`` is the cheap check of an announcement before it is kept: with a
snapshot key its signature must verify (``recloop.core.snapshot_auth``); its path must be the
learner's name for that policy and version and resolve to a real directory under the
snapshot root (``recloop.core.snapshot.resolve_announcement``: no absolute path, no ``..``,
no symlink). Without a key the announcement is not authenticated and the log says so once.
``SnapshotInstaller.install`` admits it again, then reads the snapshot with
``recloop.core.snapshot.read_snapshot`` (regular files only, size caps), checking both files
against the SHA-256 the (signed) announcement carries, checks the manifest names
the announced policy and version, builds the policy with the injected loader (serving never
imports the learner) and, if the policy has learned item embeddings, their faiss index
(a policy without them retrieves from the index of the catalogue's features,
``serving.items``); only then does it swap. Anything that fails leaves the current policy
serving and is counted by reason; ``services.serve_installs`` then tries the newest older
announcement above what serves.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import SecretStr

from recloop.core import snapshot_auth
from recloop.core.events import PolicyPublished
from recloop.core.ports import SlatePolicy
from recloop.core.snapshot import (
    DEFAULT_MAX_WEIGHTS_BYTES,
    SnapshotError,
    read_snapshot,
    resolve_announced,
    resolve_announcement,
)
from recloop.serving.host import PolicyHost, StaleVersionError
from recloop.serving.retrieval import CatalogueIndex

log = logging.getLogger(__name__)

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
        *,
        key: SecretStr | None = None,
        max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
        recall_m: int = 100,
    ) -> None:
        self.host = host
        self.recall_m = recall_m
        self.loader = loader
        self.snapshot_root = Path(snapshot_root) if snapshot_root is not None else None
        self.index_kind = index_kind
        self.max_weights_bytes = max_weights_bytes
        self._key = key
        self.counts: Counter[str] = Counter()
        self.last_refusal = ""
        if snapshot_auth.key_bytes(key) is None:
            snapshot_auth.warn_unauthenticated("serve")

    @property
    def authenticates(self) -> bool:
        """Whether an admitted announcement is the learner's (a snapshot key is configured)."""
        return snapshot_auth.key_bytes(self._key) is not None

    def resolve(self, path: str) -> Path:
        """An announced relative path under the snapshot root (``SnapshotError`` if refused)."""
        return resolve_announced(self.snapshot_root, path)

    def admit(self, published: PolicyPublished) -> InstallResult | None:
        """``None`` if ``published`` may be kept for installing, else its refusal (counted)."""
        try:
            self._admitted(published)
        except SnapshotError as exc:
            result = InstallResult("refused", published.policy, published.version, str(exc))
            self.counts[result.status] += 1
            self.last_refusal = result.reason
            return result
        return None

    def _admitted(self, published: PolicyPublished) -> Path:
        snapshot_auth.verify(published, self._key)
        return resolve_announcement(self.snapshot_root, published.policy, published.version,
                                    published.path)  # fmt: skip

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
                self._admitted(published),
                expected_weights_sha256=published.weights_sha256,
                expected_manifest_sha256=published.manifest_sha256,
                max_weights_bytes=self.max_weights_bytes,
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
            index = self._index_for(policy, name, version)
        except Exception as exc:  # a loader or an index build may fail in many ways
            return InstallResult("refused", name, version, f"load: {type(exc).__name__}: {exc}")
        try:
            self.host.swap(name, version, policy, algorithm=published.algorithm, index=index)
        except StaleVersionError as exc:
            return InstallResult("stale", name, version, str(exc))
        return InstallResult("swapped", name, version)

    def _index_for(self, policy: SlatePolicy, name: str, version: int) -> CatalogueIndex | None:
        embeddings = getattr(policy, "item_embeddings", None)
        embeddings_ND = embeddings() if callable(embeddings) else None
        if embeddings_ND is None:
            return None
        index = CatalogueIndex(np.asarray(embeddings_ND), kind=self.index_kind,
                               recall_m=self.recall_m,
                               source=f"{name} v{version} item embeddings")  # fmt: skip
        log.info("index of %s v%d: %s", name, version, index.report())
        return index
