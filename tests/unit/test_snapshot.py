"""The pickle-free snapshot format: exact round-trips, and refusal of anything not intact."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recloop.core.snapshot import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    SnapshotError,
    announced_path,
    describe_snapshot,
    latest_snapshot,
    read_snapshot,
    resolve_announced,
    sha256_hex,
    write_snapshot,
)


def _manifest(**extra):
    base = {
        "algorithm": "slateq",
        "config": {"lr": 0.001, "hidden": [64, 32]},
        "metrics": {"loss": 0.25},
        "consumed_offsets": {"rec.transitions": {"0": 17, "1": 4}},
        "transitions_applied": 21,
    }
    base.update(extra)
    return base


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "item_emb_ND": rng.standard_normal((5, 3)).astype(np.float32),
        "bias_N": rng.standard_normal(5),
        "counts_N": np.arange(5, dtype=np.int64),
        "mask_N": np.array([True, False, True, True, False]),
        "half_D": np.array([0.5, -1.0, 2.0], dtype=np.float16),
        "scalar": np.array(3.0, dtype=np.float32),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_round_trip_is_exact_and_manifest_complete(tmp_path):
    tensors = _tensors()
    ref = write_snapshot(tmp_path, "slateq", 3, tensors, _manifest())

    assert ref.path == tmp_path / "slateq" / "v00000003"
    assert sorted(p.name for p in ref.path.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]
    assert ref.weights_sha256 == sha256_hex((ref.path / WEIGHTS_FILE).read_bytes())
    assert ref.manifest_sha256 == sha256_hex((ref.path / MANIFEST_FILE).read_bytes())

    got, manifest = read_snapshot(ref.path, ref.weights_sha256, ref.manifest_sha256)
    _assert_same(got, tensors)
    assert manifest == ref.manifest
    assert manifest["version"] == 3 and manifest["policy"] == "slateq"
    assert manifest["algorithm"] == "slateq"
    assert manifest["consumed_offsets"] == {"rec.transitions": {"0": 17, "1": 4}}
    assert manifest["transitions_applied"] == 21
    assert manifest["weights_sha256"] == ref.weights_sha256
    assert manifest["created_ts"] > 1.6e9
    meta = ref.meta()
    assert meta["transitions_applied"] == 21 and meta["path"] == str(ref.path)


def test_strided_and_big_endian_arrays_round_trip_by_value(tmp_path):
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    tensors = {"transposed": base.T, "every_other": base[:, ::2], "be": base.astype(">f8")}
    ref = write_snapshot(tmp_path, "p", 0, tensors, _manifest())
    got, _ = read_snapshot(ref.path)
    np.testing.assert_array_equal(got["transposed"], base.T)
    np.testing.assert_array_equal(got["every_other"], base[:, ::2])
    np.testing.assert_array_equal(got["be"], base.astype(np.float64))
    assert got["be"].dtype == np.float64


def test_tampered_weights_are_refused(tmp_path):
    ref = write_snapshot(tmp_path, "p", 1, _tensors(), _manifest())
    weights = ref.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor value
    weights.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="SHA-256"):
        read_snapshot(ref.path)
    with pytest.raises(SnapshotError, match="SHA-256"):
        read_snapshot(ref.path, ref.weights_sha256, ref.manifest_sha256)


def test_tampered_manifest_is_refused_when_its_hash_is_known(tmp_path):
    ref = write_snapshot(tmp_path, "p", 1, _tensors(), _manifest())
    path = ref.path / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["metrics"]["loss"] = 0.0  # a forged figure, weights untouched
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="SHA-256"):
        read_snapshot(ref.path, expected_manifest_sha256=ref.manifest_sha256)


def test_manifest_pointing_at_other_weights_is_refused(tmp_path):
    ref = write_snapshot(tmp_path, "p", 1, _tensors(), _manifest())
    other = write_snapshot(tmp_path, "p", 2, {"x": np.zeros(2)}, _manifest())
    # Swap in the other snapshot's weights: the manifest's own hash catches it.
    (ref.path / WEIGHTS_FILE).write_bytes((other.path / WEIGHTS_FILE).read_bytes())
    with pytest.raises(SnapshotError, match="manifest"):
        read_snapshot(ref.path)


def test_expected_weights_hash_mismatch_is_refused(tmp_path):
    ref = write_snapshot(tmp_path, "p", 1, _tensors(), _manifest())
    with pytest.raises(SnapshotError, match="expected"):
        read_snapshot(ref.path, expected_weights_sha256="0" * 64)


def test_truncated_weights_are_refused_even_with_a_consistent_manifest(tmp_path):
    ref = write_snapshot(tmp_path, "p", 1, _tensors(), _manifest())
    weights = ref.path / WEIGHTS_FILE
    truncated = weights.read_bytes()[:-7]
    weights.write_bytes(truncated)
    with pytest.raises(SnapshotError, match="SHA-256"):
        read_snapshot(ref.path)
    # An attacker (or bug) that also rewrites the manifest hash still gets no tensors.
    manifest_path = ref.path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["weights_sha256"] = sha256_hex(truncated)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="safetensors"):
        read_snapshot(ref.path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / WEIGHTS_FILE).unlink(), "missing"),
        (lambda p: (p / MANIFEST_FILE).unlink(), "missing"),
        (lambda p: (p / MANIFEST_FILE).write_bytes(b'{"algorithm": '), "JSON"),
        (lambda p: (p / MANIFEST_FILE).write_bytes(b"[1, 2]"), "object"),
        (lambda p: (p / MANIFEST_FILE).write_bytes(b"\xff\xfe"), "JSON"),
        (lambda p: (p / MANIFEST_FILE).write_text('{"format": "pickle"}'), "format"),
    ],
)
def test_missing_or_unreadable_files_are_refused(tmp_path, damage, message):
    ref = write_snapshot(tmp_path, "p", 1, _tensors(), _manifest())
    damage(ref.path)
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(ref.path)


def test_missing_snapshot_directory_is_refused(tmp_path):
    with pytest.raises(SnapshotError, match="missing"):
        read_snapshot(tmp_path / "p" / "v00000009")


def test_latest_ignores_leftover_temp_dirs_and_picks_highest_version(tmp_path):
    assert latest_snapshot(tmp_path, "p") is None
    write_snapshot(tmp_path, "p", 2, _tensors(), _manifest())
    write_snapshot(tmp_path, "p", 10, _tensors(), _manifest())
    write_snapshot(tmp_path, "other", 99, _tensors(), _manifest())
    # What a crash half-way through writing version 11 leaves behind.
    leftover = tmp_path / "p" / ".tmp-v00000011-123-abcd"
    leftover.mkdir()
    (leftover / WEIGHTS_FILE).write_bytes(b"partial")

    latest = latest_snapshot(tmp_path, "p")
    assert latest is not None
    assert latest.version == 10 and latest.policy == "p"
    assert latest == describe_snapshot(tmp_path / "p" / "v00000010")
    tensors, _ = read_snapshot(latest.path, latest.weights_sha256, latest.manifest_sha256)
    _assert_same(tensors, _tensors())


def test_write_leaves_no_temp_dir_and_never_overwrites(tmp_path):
    write_snapshot(tmp_path, "p", 1, _tensors(), _manifest())
    with pytest.raises(SnapshotError, match="already exists"):
        write_snapshot(tmp_path, "p", 1, {"x": np.zeros(1)}, _manifest())
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["v00000001"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        write_snapshot(tmp_path, "p", 1, {"x": np.array([1 + 2j])}, _manifest())
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


@pytest.mark.parametrize(
    ("policy", "version", "tensors", "manifest", "message"),
    [
        ("../evil", 1, {}, _manifest(), "policy name"),
        ("", 1, {}, _manifest(), "policy name"),
        ("p", -1, {}, _manifest(), "non-negative"),
        ("p", True, {}, _manifest(), "non-negative"),
        ("p", 1, {"x": [1, 2]}, _manifest(), "numpy"),
        ("p", 1, {"x": np.array(["a"], dtype=object)}, _manifest(), "safetensors"),
        ("p", 1, {}, {"algorithm": "x"}, "required"),
        ("p", 1, {}, _manifest(version=3), "set by write_snapshot"),
        ("p", 1, {}, _manifest(metrics={"loss": float("nan")}), "finite JSON"),
        ("p", 1, {}, _manifest(config={"f": object()}), "finite JSON"),
    ],
)
def test_bad_arguments_get_clear_errors(tmp_path, policy, version, tensors, manifest, message):
    with pytest.raises(ValueError, match=message):
        write_snapshot(tmp_path, policy, version, tensors, manifest)


_DTYPES = st.sampled_from(
    [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_]
)
_ARRAYS = _DTYPES.flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    )
)
_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(tensors=st.dictionaries(_NAMES, _ARRAYS, max_size=5), transpose=st.booleans())
def test_round_trip_property(tensors, transpose):
    if transpose:  # also exercise non-contiguous inputs
        tensors = {name: array.T for name, array in tensors.items()}
    with tempfile.TemporaryDirectory() as root:
        ref = write_snapshot(Path(root), "prop", 7, tensors, _manifest())
        got, manifest = read_snapshot(ref.path, ref.weights_sha256, ref.manifest_sha256)
    assert set(got) == set(tensors)
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        # Bitwise equality, so NaNs and signed zeros count as round-tripped exactly.
        assert got[name].tobytes() == np.asarray(array, order="C").tobytes()


def test_an_announced_path_is_found_under_a_root_mounted_elsewhere(tmp_path, monkeypatch) -> None:
    """The learner names a snapshot relative to its root; a server with the same root mounted
    at another place (another container), or given it as a relative path, finds it."""
    monkeypatch.chdir(tmp_path)
    learner_root = Path("artifacts/demo/run/snapshots")  # relative, as `recloop demo` makes it
    ref = write_snapshot(learner_root, "slateq", 3, _tensors(), _manifest())
    announced = announced_path(learner_root, ref.path)
    assert announced == "slateq/v00000003"
    server_root = tmp_path / "mounted-here"
    learner_root.rename(server_root)
    found = resolve_announced(server_root, announced)
    tensors, manifest = read_snapshot(found, ref.weights_sha256, ref.manifest_sha256)
    assert manifest["version"] == 3 and set(tensors) == set(_tensors())


def test_a_snapshot_outside_the_root_is_refused_not_announced_by_its_absolute_path(
    tmp_path,
) -> None:
    """Issue 12, finding 4: an absolute path used to be announced and read as given."""
    ref = write_snapshot(tmp_path / "elsewhere", "mf", 1, _tensors(), _manifest())
    (tmp_path / "root").mkdir()
    with pytest.raises(ValueError, match="outside the snapshot root"):
        announced_path(tmp_path / "root", ref.path)
    with pytest.raises(SnapshotError, match="absolute"):
        resolve_announced(tmp_path / "root", str(ref.path.resolve()))
