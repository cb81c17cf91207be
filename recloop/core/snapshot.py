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

Nothing read here is trusted (anyone who can write to ``policy.snapshots`` chooses the
announced path):

- ``resolve_announced`` accepts only a relative path of plain names under the snapshot root:
  no absolute path, no ``..``, no component that is a symlink, nothing that resolves outside
  the root. Every refusal that depends on the file system has the same text, so a refusal
  never tells whether something outside the root exists.
- Both files are opened without following a symlink and without blocking (a FIFO cannot stall
  the reader), must be regular files, and are read only up to a cap (``MAX_MANIFEST_BYTES``;
  the weights' cap is the caller's, ``DEFAULT_MAX_WEIGHTS_BYTES`` unless told).
- Any failure to parse a manifest, of whatever kind (bad UTF-8, bad JSON, nesting deep
  enough for ``RecursionError``, a field of the wrong type), is a ``SnapshotError``.

Who may announce is ``recloop.core.snapshot_auth``'s business (the learner's HMAC).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
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

MAX_MANIFEST_BYTES = 1 << 20
"""Largest ``manifest.json`` read (1 MiB; the learner's are a few kB)."""
DEFAULT_MAX_WEIGHTS_BYTES = 1 << 30
"""Largest ``weights.safetensors`` read unless the caller says otherwise (1 GiB)."""
REFUSED_PATH = "is not a snapshot directory under the snapshot root"
"""The one refusal text for an announced path that is missing, outside the root or reached
through a symlink, so a refusal reveals nothing about what exists outside the root."""

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
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
    root, so a process that mounts the root elsewhere (another container) still finds it.

    Raises ``ValueError`` for a directory outside the root: no reader would accept it.
    """
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        raise ValueError(f"snapshot {path} lies outside the snapshot root {root}") from None


def resolve_announced(root: Path | None, announced: str) -> Path:
    """The directory an announced path names under ``root``, or ``SnapshotError``.

    ``announced`` must be relative, of plain names (no ``..``, no ``.``, no empty or NUL
    component), and each component must be a real directory under the resolved root, not a
    symlink. The root itself is configuration and may be reached through a symlink.
    """
    if root is None:
        raise SnapshotError(f"announced path {announced!r}: no snapshot root is configured")
    if not isinstance(announced, str) or not announced or "\0" in announced:
        raise SnapshotError(f"announced path {announced!r} is not a relative path")
    if announced.startswith(("/", "\\")) or Path(announced).is_absolute():
        raise SnapshotError(f"announced path {announced!r} is absolute; only paths under the "
                            "snapshot root are read")  # fmt: skip
    parts = announced.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise SnapshotError(f"announced path {announced!r} has an empty, '.' or '..' component")
    try:
        base = Path(root).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise SnapshotError(f"snapshot root {root} is not usable: {exc}") from exc
    here = base
    for part in parts:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except (OSError, ValueError):
            mode = 0
        if not stat.S_ISDIR(mode):  # missing, a symlink, or not a directory: all alike
            raise SnapshotError(f"announced path {announced!r} {REFUSED_PATH}")
    return here


def resolve_announcement(root: Path | None, policy: str, version: int, announced: str) -> Path:
    """``resolve_announced`` for the announcement of ``policy`` v``version``: its path must
    also be the one the learner names that snapshot by (``<policy>/v<version:08d>``), so an
    announcement cannot pass one snapshot off as another version or policy."""
    check_announced_name(policy, version, announced)
    return resolve_announced(root, announced)


def check_announced_name(policy: str, version: int, announced: str) -> None:
    """``SnapshotError`` unless ``announced`` is ``<policy>/v<version:08d>``: the lexical
    half of ``resolve_announcement`` (no file system access)."""
    try:
        expected = f"{policy}/{snapshot_dir(Path('.'), policy, version).name}"
    except ValueError as exc:
        raise SnapshotError(f"announcement of {policy!r} v{version}: {exc}") from exc
    if announced != expected:
        raise SnapshotError(f"announced path {announced!r} is not {expected!r}, where "
                            f"{policy!r} v{version} lives")  # fmt: skip


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
    max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify the snapshot in directory ``path``; return ``(tensors, manifest)``.

    The weights must always match the manifest's ``weights_sha256``; when the expected
    hashes are given (from recloop.storage or a ``PolicyPublished`` event) both files must match
    them too. Both must be regular files within their caps. Any failure raises
    ``SnapshotError``.
    """
    path = Path(path)
    manifest_bytes = _read_file(path / MANIFEST_FILE, MAX_MANIFEST_BYTES)
    manifest_sha = sha256_hex(manifest_bytes)
    if expected_manifest_sha256 is not None and manifest_sha != expected_manifest_sha256:
        raise SnapshotError(
            f"{path / MANIFEST_FILE}: SHA-256 {manifest_sha} != expected {expected_manifest_sha256}"
        )
    manifest = _decode_manifest(manifest_bytes, path)

    # Hash and parse the same bytes, so the file cannot change between check and use.
    weights = _read_file(path / WEIGHTS_FILE, max_weights_bytes)
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
    manifest_bytes = _read_file(path / MANIFEST_FILE, MAX_MANIFEST_BYTES)
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
    where = path / MANIFEST_FILE
    try:
        manifest = json.loads(data.decode("utf-8"))
    except Exception as exc:  # RecursionError, UnicodeDecodeError, huge ints: all the same
        raise SnapshotError(f"{where}: not valid JSON: {type(exc).__name__}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{where}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in (*REQUIRED_KEYS, *WRITER_KEYS) if key not in manifest]
    if missing:
        raise SnapshotError(f"{where}: lacks keys {missing}")
    wrong = [key for key, ok in _field_checks(manifest) if not ok]
    if wrong:
        raise SnapshotError(f"{where}: keys {wrong} have the wrong type")
    return manifest


def _field_checks(manifest: dict[str, Any]) -> list[tuple[str, bool]]:
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    ts = manifest["created_ts"]
    sha = manifest["weights_sha256"]
    return [
        ("policy", isinstance(manifest["policy"], str)),
        ("version", integer(manifest["version"])),
        ("algorithm", isinstance(manifest["algorithm"], str)),
        ("created_ts", isinstance(ts, int | float) and not isinstance(ts, bool)),
        ("weights_sha256", isinstance(sha, str) and bool(_SHA256_RE.match(sha))),
        ("transitions_applied", integer(manifest["transitions_applied"])),
        ("config", isinstance(manifest["config"], dict)),
        ("metrics", isinstance(manifest["metrics"], dict)),
        ("consumed_offsets", isinstance(manifest["consumed_offsets"], dict)),
    ]


def _read_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``), or ``SnapshotError``.

    ``O_NOFOLLOW`` refuses a symlink, ``O_NONBLOCK`` keeps a FIFO from blocking the open, and
    ``fstat`` on the open descriptor refuses anything but a regular file (FIFO, device,
    socket, directory) before a byte is read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path}: missing") from exc
    except OSError as exc:  # ELOOP for a symlink
        raise SnapshotError(f"{path}: not a regular file or unreadable: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise SnapshotError(f"{path}: {info.st_size} bytes, over the {limit}-byte cap")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew while being read
                raise SnapshotError(f"{path}: over the {limit}-byte cap")
        return b"".join(chunks)
    except OSError as exc:
        raise SnapshotError(f"{path}: unreadable: {exc.strerror}") from exc
    finally:
        os.close(fd)


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
