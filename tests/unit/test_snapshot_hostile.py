"""Hostile snapshot announcements are refused (issue 12, finding 4).

Anyone who can write to ``policy.snapshots`` chooses the announced path, version and hashes.
Each case of the finding: absolute paths, ``..``, a symlink out of the root, a FIFO named
``manifest.json`` (must not block), a manifest symlinked to ``/dev/zero``, an oversized
manifest, a refusal text that would tell what exists outside the root, a forged huge version
that made every real version "stale", announcements without the learner's signature when a
key is set, the monitor reading announced paths unchecked, and manifest parse errors that
escaped as other exceptions.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recloop.core.events import PolicyPublished
from recloop.core.settings import Settings
from recloop.core.snapshot import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    SnapshotError,
    describe_snapshot,
    read_snapshot,
    resolve_announced,
    write_snapshot,
)
from recloop.serving.host import PolicyHost
from recloop.serving.snapshots import SnapshotInstaller
from tests.unit.test_serving_snapshots import load_score_policy

POLICY = "learned"
KEY = "a-test-snapshot-key"
N_ITEMS = 8


def _write(root: Path, version: int, policy: str = POLICY):
    manifest = {"algorithm": "score", "config": {}, "metrics": {}, "consumed_offsets": {},
                "transitions_applied": 0, "service": {"newest_event_ts": 123.0}}  # fmt: skip
    scores_I = np.zeros(N_ITEMS)
    scores_I[version % N_ITEMS] = 1.0
    return write_snapshot(root, policy, version, {"scores_I": scores_I}, manifest)


def _announce(ref, path: str | None = None, version: int | None = None) -> PolicyPublished:
    return PolicyPublished(
        policy=ref.policy, algorithm="score",
        version=ref.version if version is None else version,
        path=f"{ref.policy}/{ref.path.name}" if path is None else path,
        weights_sha256=ref.weights_sha256, manifest_sha256=ref.manifest_sha256,
        created_ts=ref.created_ts,
    )  # fmt: skip


def _signed(published: PolicyPublished, key: str = KEY) -> PolicyPublished:
    from recloop.core.snapshot_auth import sign

    return sign(published, key)


def _installer(root: Path, key: str | None = None) -> SnapshotInstaller:
    host = PolicyHost([POLICY])
    if key is None:
        return SnapshotInstaller(host, load_score_policy, root)
    from pydantic import SecretStr

    return SnapshotInstaller(host, load_score_policy, root, key=SecretStr(key))


def _within(seconds: float, fn: Callable[[], Any]) -> tuple[bool, Any]:
    """Run ``fn`` in a thread; (finished within ``seconds``, its result or exception)."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever it raised
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return (not thread.is_alive()), (out[0] if out else None)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "snapshots"
    path.mkdir()
    return path


# -- confinement ---------------------------------------------------------------------------


def test_an_absolute_path_is_refused_even_to_a_valid_snapshot(tmp_path, root):
    ref = _write(tmp_path / "elsewhere", 1)
    with pytest.raises(SnapshotError, match="absolute"):
        resolve_announced(root, str(ref.path))
    result = _installer(root).install(_announce(ref, path=str(ref.path)))
    assert result.status == "refused" and "absolute" in result.reason


@pytest.mark.parametrize(
    "announced",
    [
        "../elsewhere/learned/v00000001",
        "learned/../../elsewhere/learned/v00000001",
        "learned/./v00000001",
        "learned//v00000001",
        "",
    ],
)
def test_dot_dot_and_odd_components_are_refused(tmp_path, root, announced):
    _write(tmp_path / "elsewhere", 1)
    _write(root, 1)
    with pytest.raises(SnapshotError):
        resolve_announced(root, announced)


def test_a_symlink_out_of_the_root_is_refused(tmp_path, root):
    outside = _write(tmp_path / "elsewhere", 1)
    (root / POLICY).symlink_to(outside.path.parent, target_is_directory=True)
    with pytest.raises(SnapshotError):
        resolve_announced(root, f"{POLICY}/v00000001")
    result = _installer(root).install(_announce(outside))
    assert result.status == "refused"
    # A version directory symlinked out is refused too.
    (root / POLICY).unlink()
    (root / POLICY).mkdir()
    (root / POLICY / "v00000001").symlink_to(outside.path, target_is_directory=True)
    with pytest.raises(SnapshotError):
        resolve_announced(root, f"{POLICY}/v00000001")


def test_the_refusal_does_not_tell_whether_something_exists_outside_the_root(tmp_path, root):
    outside = _write(tmp_path / "elsewhere", 1)
    reasons = []
    for exists in (False, True):
        if exists:
            (root / POLICY).symlink_to(outside.path.parent, target_is_directory=True)
        result = _installer(root).install(_announce(outside))
        assert result.status == "refused"
        reasons.append(result.reason)
    assert reasons[0] == reasons[1], reasons


def test_an_announcement_must_name_the_directory_of_its_own_version(root):
    real = _write(root, 1)
    # A forged huge version pointing at a real snapshot's directory.
    result = _installer(root).install(_announce(real, version=10**12))
    assert result.status == "refused" and "v1000000000000" in result.reason


# -- regular files only, size caps ---------------------------------------------------------


def test_a_fifo_named_manifest_json_does_not_block_the_reader(root):
    ref = _write(root, 1)
    manifest = ref.path / MANIFEST_FILE
    manifest.unlink()
    os.mkfifo(manifest)
    try:
        finished, outcome = _within(5.0, lambda: read_snapshot(ref.path))
        assert finished, "reading a FIFO manifest blocked"
        assert isinstance(outcome, SnapshotError), outcome
        finished, result = _within(5.0, lambda: _installer(root).install(_announce(ref)))
        assert finished and result.status == "refused"
    finally:
        # Unblock a reader that did block (the old code), so the thread can end.
        with contextlib.suppress(OSError):
            os.close(os.open(manifest, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_named_weights_does_not_block_the_reader(root):
    ref = _write(root, 1)
    weights = ref.path / WEIGHTS_FILE
    weights.unlink()
    os.mkfifo(weights)
    try:
        finished, outcome = _within(5.0, lambda: read_snapshot(ref.path))
        assert finished and isinstance(outcome, SnapshotError), outcome
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(weights, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_manifest_symlinked_to_dev_zero_is_refused_without_reading_it(root):
    ref = _write(root, 1)
    (ref.path / MANIFEST_FILE).unlink()
    (ref.path / MANIFEST_FILE).symlink_to("/dev/zero")
    finished, outcome = _within(5.0, lambda: describe_snapshot(ref.path))
    assert finished and isinstance(outcome, SnapshotError), outcome
    finished, outcome = _within(5.0, lambda: read_snapshot(ref.path))
    assert finished and isinstance(outcome, SnapshotError), outcome


def test_a_symlinked_manifest_inside_the_root_is_refused_too(root):
    ref = _write(root, 1)
    copy = root / "copy.json"
    copy.write_bytes((ref.path / MANIFEST_FILE).read_bytes())
    (ref.path / MANIFEST_FILE).unlink()
    (ref.path / MANIFEST_FILE).symlink_to(copy)
    with pytest.raises(SnapshotError):
        read_snapshot(ref.path)


def test_an_oversized_manifest_is_refused(root):
    ref = _write(root, 1)
    manifest = json.loads((ref.path / MANIFEST_FILE).read_bytes())
    manifest["config"] = {"padding": "x" * (2 << 20)}  # valid JSON, 2 MiB
    (ref.path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="cap"):
        describe_snapshot(ref.path)
    with pytest.raises(SnapshotError, match="cap"):
        read_snapshot(ref.path)


def test_weights_over_the_configured_cap_are_refused(root):
    ref = _write(root, 1)
    size = (ref.path / WEIGHTS_FILE).stat().st_size
    read_snapshot(ref.path, max_weights_bytes=size)
    with pytest.raises(SnapshotError, match="cap"):
        read_snapshot(ref.path, max_weights_bytes=size - 1)
    assert Settings().snapshot_max_weights_bytes == 1 << 30


# -- every manifest parse error is a SnapshotError ------------------------------------------


def _manifest_bytes(ref, **changes: Any) -> bytes:
    manifest = json.loads((ref.path / MANIFEST_FILE).read_bytes())
    manifest.update(changes)
    return json.dumps(manifest).encode()


MALFORMED: dict[str, Callable[[Any], bytes]] = {
    "not utf-8": lambda ref: b"\xff\xfe{\x00",
    "truncated json": lambda ref: _manifest_bytes(ref)[:-7],
    "deep nesting": lambda ref: b"[" * 200_000 + b"]" * 200_000,
    "deep nesting in a field": lambda ref: (
        _manifest_bytes(ref)[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    ),
    "huge integer": lambda ref: _manifest_bytes(ref)[:-1] + b', "x": ' + b"9" * 5000 + b"}",
    "a list": lambda ref: b"[1, 2, 3]",
    "version a string": lambda ref: _manifest_bytes(ref, version="1"),
    "version a bool": lambda ref: _manifest_bytes(ref, version=True),
    "version negative": lambda ref: _manifest_bytes(ref, version=-4),
    "created_ts a string": lambda ref: _manifest_bytes(ref, created_ts="yesterday"),
    "created_ts a list": lambda ref: _manifest_bytes(ref, created_ts=[1.0]),
    "policy a number": lambda ref: _manifest_bytes(ref, policy=7),
    "algorithm null": lambda ref: _manifest_bytes(ref, algorithm=None),
    "weights_sha256 a dict": lambda ref: _manifest_bytes(ref, weights_sha256={"a": 1}),
    "config a list": lambda ref: _manifest_bytes(ref, config=[1]),
    "metrics a string": lambda ref: _manifest_bytes(ref, metrics="fast"),
    "offsets a number": lambda ref: _manifest_bytes(ref, consumed_offsets=3),
    "transitions a float": lambda ref: _manifest_bytes(ref, transitions_applied=2.5),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_every_kind_of_malformed_manifest_is_a_snapshot_error(root, kind):
    ref = _write(root, 1)
    (ref.path / MANIFEST_FILE).write_bytes(MALFORMED[kind](ref))
    for read in (describe_snapshot, read_snapshot):
        try:
            read(ref.path)
        except SnapshotError:
            continue
        except BaseException as exc:  # noqa: BLE001 - exactly what must not happen
            pytest.fail(f"{kind}: {read.__name__} raised {type(exc).__name__}: {exc!s:.200}")
        pytest.fail(f"{kind}: {read.__name__} accepted it")


# -- authentication ------------------------------------------------------------------------


def test_with_a_key_an_unsigned_announcement_is_refused(root):
    ref = _write(root, 1)
    result = _installer(root, KEY).install(_announce(ref))
    assert result.status == "refused" and "unsigned" in result.reason


def test_with_a_key_a_badly_signed_announcement_is_refused(root):
    ref = _write(root, 1)
    for forged in (
        _signed(_announce(ref), "another key"),
        _announce(ref).__class__(**{**_fields(_announce(ref)), "signature": "0" * 64}),
    ):
        result = _installer(root, KEY).install(forged)
        assert result.status == "refused" and "signature" in result.reason


def test_a_signed_announcement_replayed_with_another_path_or_version_is_refused(root):
    v1, v2 = _write(root, 1), _write(root, 2)
    good = _signed(_announce(v1))
    assert _installer(root, KEY).install(good).status == "swapped"
    for field, value in (("path", f"{POLICY}/{v2.path.name}"), ("version", 2),
                         ("weights_sha256", v2.weights_sha256)):  # fmt: skip
        replayed = PolicyPublished(**{**_fields(good), field: value})
        result = _installer(root, KEY).install(replayed)
        assert result.status == "refused" and "signature" in result.reason, field


def test_a_signed_announcement_is_installed_and_the_key_is_never_shown(root):
    ref = _write(root, 1)
    installer = _installer(root, KEY)
    assert installer.install(_signed(_announce(ref))).status == "swapped"
    settings = Settings(snapshot_key=KEY)
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())


def _fields(published: PolicyPublished) -> dict[str, Any]:
    return {name: getattr(published, name) for name in published.__struct_fields__}


# -- a refused announcement never changes which version is newest ---------------------------


def _installs(root: Path, key: str | None = None):
    from recloop.services.serve_installs import Installs

    installer = _installer(root, key)
    return Installs(installer, deque(), deque()), installer


@pytest.mark.parametrize("key", [None, KEY])
def test_a_forged_huge_version_does_not_make_real_versions_stale(root, key):
    from recloop.services.serve_installs import KEEP

    installs, installer = _installs(root, key)
    v1 = _write(root, 1)
    sign = (lambda p: _signed(p)) if key else (lambda p: p)
    installs.announce(sign(_announce(v1)))
    installs.install_pending()
    assert installer.host.version(POLICY) == 1
    # Forged: huge versions, each pointing at the real snapshot or at nothing; with a key
    # they are signed with a wrong one. More of them than the kept window holds.
    for i in range(KEEP + 4):
        forged = _announce(
            v1, version=10**12 + i, path=f"{POLICY}/v{10**12 + i:08d}" if i % 2 else None
        )
        installs.announce(_signed(forged, "wrong") if key else forged)
    v2 = _write(root, 2)
    installs.announce(sign(_announce(v2)))
    installs.install_pending()
    assert installer.host.version(POLICY) == 2
    assert installs.newest(POLICY) == 2
    statuses = [r.status for r in installs.results]
    assert statuses.count("refused") == KEEP + 4 and statuses[-1] == "swapped"
    from prometheus_client import REGISTRY

    behind = REGISTRY.get_sample_value("recloop_serving_behind_newest", {"policy": POLICY})
    assert behind == 0


# -- the monitor goes through the same checks -------------------------------------------------


class _Storage:
    def __init__(self, rows: dict | None = None) -> None:
        self.rows = rows or {}

    def snapshot(self, policy: str, version: int):
        return self.rows.get((policy, version))


def _monitor(root: Path, storage: _Storage, key: str | None):
    from recloop.ops.monitor import LoopMonitor

    settings = Settings(kafka_bootstrap="127.0.0.1:9", snapshot_dir=root, snapshot_key=key)
    return LoopMonitor(settings, storage, "run", [])  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [None, KEY])
def test_the_monitor_refuses_what_serving_refuses(tmp_path, root, key):
    outside = _write(tmp_path / "elsewhere", 5)
    real = _write(root, 1)
    monitor = _monitor(root, _Storage(), key)
    try:
        hostile = [
            _announce(outside, path=str(outside.path)),  # absolute
            _announce(outside, path=f"../elsewhere/{POLICY}/v00000005"),
            _announce(real, version=10**12),  # a forged huge version
        ]
        if key:
            hostile.append(_announce(real))  # unsigned
        for record in hostile:
            monitor._observe(_signed(record) if key and record.version != 1 else record)
        assert monitor.refused == len(hostile)
        assert monitor.view.versions.get(POLICY) is None and not monitor.versions
        good = _signed(_announce(real)) if key else _announce(real)
        monitor._observe(good)
        assert monitor.view.versions[POLICY] == 1
        assert monitor.versions[(POLICY, 1)].newest_event_ts == 123.0
    finally:
        monitor.consumer.close()


def test_the_monitor_without_a_key_checks_the_hashes_storage_recorded(root):
    real = _write(root, 1)
    row = {"weights_sha256": "0" * 64, "manifest_sha256": real.manifest_sha256}
    monitor = _monitor(root, _Storage({(POLICY, 1): row}), None)
    try:
        monitor._observe(_announce(real))
        assert monitor.refused == 1 and not monitor.versions
    finally:
        monitor.consumer.close()


def test_the_monitor_counts_a_signed_version_it_cannot_read_without_freshness(tmp_path, root):
    """A remote deployment need not share the snapshot directory with the monitor."""
    elsewhere = _write(tmp_path / "learner-root", 3)
    monitor = _monitor(root, _Storage(), KEY)
    try:
        monitor._observe(_signed(_announce(elsewhere)))
        assert monitor.refused == 0 and monitor.view.versions[POLICY] == 3
        assert monitor.versions[(POLICY, 3)].newest_event_ts is None
    finally:
        monitor.consumer.close()


class _LearnerStorage:
    def __init__(self) -> None:
        self.rows: dict = {}

    def record_snapshot(self, meta: dict) -> None:
        self.rows[(meta["policy"], meta["version"])] = meta

    def latest_snapshot(self, policy: str):
        return None

    def snapshot(self, policy: str, version: int):
        return self.rows.get((policy, version))


class _Agent:
    def state_tensors(self):
        return {"scores_I": np.arange(N_ITEMS, dtype=np.float64)}


def test_the_learner_signs_what_serving_with_the_same_key_installs(root):
    from pydantic import SecretStr

    from recloop.services.learn_snapshots import DiskSnapshots

    manifest = {"algorithm": "score", "config": {}, "metrics": {}, "consumed_offsets": {},
                "transitions_applied": 0}  # fmt: skip
    learner = DiskSnapshots(root, _LearnerStorage(), key=SecretStr(KEY))
    published = learner.write(POLICY, 1, _Agent(), ["t1"], manifest)
    assert published.path == f"{POLICY}/v00000001" and len(published.signature) == 64
    assert _installer(root, KEY).install(published).status == "swapped"
    assert _installer(root, "another key").install(published).status == "refused"
    unsigned = DiskSnapshots(root, _LearnerStorage()).write(POLICY, 2, _Agent(), [], manifest)
    assert unsigned.signature == ""
    assert _installer(root, KEY).install(unsigned).status == "refused"
