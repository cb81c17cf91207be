"""The snapshot format the learner writes and serving reads: safetensors plus a JSON manifest.

A snapshot of version ``v`` of policy ``p`` is one directory::

    <root>/<p>/v<v:08d>/weights.safetensors   tensors only (no code, no pickle)
    <root>/<p>/v<v:08d>/manifest.json         algorithm, config, metrics, offsets, hashes

The directory appears atomically: it is written under a temporary name in the same parent,
every file and the directory are fsynced, then it is renamed into place. A reader therefore
sees a complete snapshot or none; leftover temporary directories (a crash mid-write) never
match the ``v<digits>`` pattern and are ignored.

``manifest.json`` carries ``weights_sha256``; storage and the ``PolicyPublished``
announcement also carry the manifest's own SHA-256, so a reader that knows both hashes
detects any change to either file. Reading never executes or unpickles anything: JSON and
safetensors are data-only formats.

A damaged directory is never repaired or removed here: it still holds its version number
(``snapshot_versions`` lists it), so no later snapshot can be written under that number.
Readers skip to an older one (the learner on resume, serving on a refused announcement).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

FORMAT = "recloop-snapshot/1"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"

# What the caller must say about a snapshot; the writer adds the rest (``WRITER_KEYS``).
REQUIRED_KEYS = ("algorithm", "config", "metrics", "consumed_offsets", "transitions_applied")
WRITER_KEYS = ("format", "policy", "version", "created_ts", "weights_sha256")

_POLICY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_DIR_RE = re.compile(r"^v(\d{8,})$")


class SnapshotError(Exception):
    """A snapshot is missing, unreadable, truncated, tampered with or otherwise not usable."""


@dataclass(frozen=True)
class SnapshotRef:
    """Where a snapshot lies and the hashes that identify it."""

    policy: str
    version: int
    path: Path
    algorithm: str
    created_ts: float
    weights_sha256: str
    manifest_sha256: str
    manifest: dict[str, Any]

    def meta(self) -> dict[str, Any]:
        """The record a ``SnapshotStore`` keeps for this snapshot."""
        return {
            "policy": self.policy,
            "algorithm": self.algorithm,
            "version": self.version,
            "created_ts": self.created_ts,
            "weights_sha256": self.weights_sha256,
            "manifest_sha256": self.manifest_sha256,
            "path": str(self.path),
            "manifest": self.manifest,
            "consumed_offsets": self.manifest.get("consumed_offsets", {}),
            "transitions_applied": int(self.manifest.get("transitions_applied", 0)),
            "metrics": self.manifest.get("metrics", {}),
        }


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def snapshot_dir(root: Path, policy: str, version: int) -> Path:
    """The directory snapshot ``version`` of ``policy`` lives in under ``root``."""
    _check_policy(policy)
    _check_version(version)
    return Path(root) / policy / f"v{version:08d}"


def announced_path(root: Path, path: Path) -> str:
    """How a snapshot directory is named in its ``PolicyPublished``: relative to the snapshot
    root, so a process that mounts the root elsewhere (another container) still finds it;
    absolute when it lies outside the root."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def resolve_announced(root: Path | None, announced: str) -> Path:
    """The directory an announced path names: absolute as given, relative under ``root``."""
    path = Path(announced)
    if path.is_absolute() or root is None:
        return path
    return Path(root) / path


def write_snapshot(
    root: Path,
    policy: str,
    version: int,
    tensors: dict[str, np.ndarray],
    manifest: dict[str, Any],
) -> SnapshotRef:
    """Write snapshot ``version`` of ``policy`` atomically and return its reference.

    ``manifest`` must hold ``REQUIRED_KEYS`` and be JSON-serialisable without NaN or
    infinity (PostgreSQL's JSON refuses them). Raises ``ValueError`` for bad arguments and
    ``SnapshotError`` if that version already exists.
    """
    final = snapshot_dir(root, policy, version)
    weights = _encode_tensors(tensors)
    full_manifest = _complete_manifest(manifest, policy, version, sha256_hex(weights))
    manifest_bytes = _encode_manifest(full_manifest)
    if final.exists():
        raise SnapshotError(f"snapshot {final} already exists; versions are never overwritten")

    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_durably(tmp / WEIGHTS_FILE, weights)
        _write_durably(tmp / MANIFEST_FILE, manifest_bytes)
        _fsync_dir(tmp)
        try:
            # rename(2) refuses a non-empty target, so a concurrent writer of the same
            # version cannot be half-overwritten: exactly one of them wins.
            os.rename(tmp, final)
        except OSError as exc:
            raise SnapshotError(f"cannot publish snapshot {final}: {exc}") from exc
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return SnapshotRef(
        policy=policy,
        version=version,
        path=final,
        algorithm=str(full_manifest["algorithm"]),
        created_ts=float(full_manifest["created_ts"]),
        weights_sha256=str(full_manifest["weights_sha256"]),
        manifest_sha256=sha256_hex(manifest_bytes),
        manifest=full_manifest,
    )


def read_snapshot(
    path: Path,
    expected_weights_sha256: str | None = None,
    expected_manifest_sha256: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify the snapshot in directory ``path``; return ``(tensors, manifest)``.

    The weights must always match the manifest's ``weights_sha256``; when the expected
    hashes are given (from recloop.storage or a ``PolicyPublished`` event) both files must match
    them too. Any failure raises ``SnapshotError``.
    """
    path = Path(path)
    manifest_bytes = _read_file(path / MANIFEST_FILE)
    manifest_sha = sha256_hex(manifest_bytes)
    if expected_manifest_sha256 is not None and manifest_sha != expected_manifest_sha256:
        raise SnapshotError(
            f"{path / MANIFEST_FILE}: SHA-256 {manifest_sha} != expected {expected_manifest_sha256}"
        )
    manifest = _decode_manifest(manifest_bytes, path)

    # Hash and parse the same bytes, so the file cannot change between check and use.
    weights = _read_file(path / WEIGHTS_FILE)
    weights_sha = sha256_hex(weights)
    for source, want in (
        ("manifest", manifest["weights_sha256"]),
        ("expected", expected_weights_sha256),
    ):
        if want is not None and weights_sha != want:
            raise SnapshotError(f"{path / WEIGHTS_FILE}: SHA-256 {weights_sha} != {source} {want}")
    try:
        tensors = safetensors.numpy.load(weights)
    except Exception as exc:  # the parser's own error types are not a stable API
        raise SnapshotError(f"{path / WEIGHTS_FILE}: not a valid safetensors file: {exc}") from exc
    return tensors, manifest


def describe_snapshot(path: Path) -> SnapshotRef:
    """A reference to the snapshot in ``path`` from its manifest (the weights are not read)."""
    path = Path(path)
    manifest_bytes = _read_file(path / MANIFEST_FILE)
    manifest = _decode_manifest(manifest_bytes, path)
    return SnapshotRef(
        policy=str(manifest["policy"]),
        version=int(manifest["version"]),
        path=path,
        algorithm=str(manifest["algorithm"]),
        created_ts=float(manifest["created_ts"]),
        weights_sha256=str(manifest["weights_sha256"]),
        manifest_sha256=sha256_hex(manifest_bytes),
        manifest=manifest,
    )


def snapshot_versions(root: Path, policy: str) -> list[tuple[int, Path]]:
    """Every ``v<digits>`` directory of ``policy`` under ``root`` as ``(version, path)``,
    newest first, whether or not its files verify (a damaged one still holds its version)."""
    _check_policy(policy)
    base = Path(root) / policy
    if not base.is_dir():
        return []
    versions = [
        (int(match.group(1)), entry)
        for entry in base.iterdir()
        if (match := _VERSION_DIR_RE.match(entry.name)) and entry.is_dir()
    ]
    return sorted(versions, reverse=True)


def latest_snapshot(root: Path, policy: str) -> SnapshotRef | None:
    """The highest-versioned complete snapshot of ``policy`` under ``root``, or ``None``."""
    versions = snapshot_versions(root, policy)
    return describe_snapshot(versions[0][1]) if versions else None


def _check_policy(policy: str) -> None:
    # The name becomes a directory: no separators, no "..", nothing hidden.
    if not isinstance(policy, str) or not _POLICY_RE.match(policy):
        raise ValueError(
            f"policy name {policy!r} must be 1-128 characters of letters, digits, '_', '.', '-'"
            " and start with a letter or digit"
        )


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"snapshot version must be a non-negative int, got {version!r}")


def _encode_tensors(tensors: dict[str, np.ndarray]) -> bytes:
    if not isinstance(tensors, dict):
        raise ValueError("tensors must be a dict of name -> numpy array")
    prepared: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(array, np.ndarray):
            raise ValueError(f"tensor {name!r} is a {type(array).__name__}, not a numpy array")
        # safetensors copies raw memory: a strided view (e.g. a transpose) would be written
        # in the wrong element order, so force C order and native byte order first
        # (not np.ascontiguousarray, which turns a 0-d array into shape (1,)).
        prepared[name] = np.asarray(array, dtype=array.dtype.newbyteorder("="), order="C")
    try:
        return safetensors.numpy.save(prepared)
    except Exception as exc:
        raise ValueError(f"tensors cannot be stored as safetensors: {exc}") from exc


def _complete_manifest(
    manifest: dict[str, Any], policy: str, version: int, weights_sha256: str
) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise ValueError("manifest must be a dict")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"manifest lacks required keys {missing}")
    reserved = [key for key in WRITER_KEYS if key in manifest]
    if reserved:
        raise ValueError(f"manifest keys {reserved} are set by write_snapshot, not the caller")
    full = dict(manifest)
    full.update(
        format=FORMAT,
        policy=policy,
        version=version,
        created_ts=time.time(),
        weights_sha256=weights_sha256,
    )
    return full


def _encode_manifest(manifest: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest is not plain finite JSON: {exc}") from exc
    return (text + "\n").encode("utf-8")


def _decode_manifest(data: bytes, path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{path / MANIFEST_FILE}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{path / MANIFEST_FILE}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise SnapshotError(
            f"{path / MANIFEST_FILE}: format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    missing = [key for key in (*REQUIRED_KEYS, *WRITER_KEYS) if key not in manifest]
    if missing:
        raise SnapshotError(f"{path / MANIFEST_FILE}: lacks keys {missing}")
    return manifest


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path}: missing") from exc
    except OSError as exc:
        raise SnapshotError(f"{path}: unreadable: {exc}") from exc


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
