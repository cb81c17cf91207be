"""Storage against real databases: a SQLite file and a PostgreSQL server the suite starts.

Every test runs on both backends (``db_url``); each gets a fresh, empty database.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
import typer
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from recloop.cli import db as db_cli
from recloop.core.ports import SnapshotStore
from recloop.core.snapshot import read_snapshot, write_snapshot
from recloop.storage import (
    Outcome,
    Sample,
    SnapshotConflict,
    Storage,
    StorageError,
    current_revision,
    head_revision,
    make_engine,
    migrate,
)
from recloop.storage.models import Base, SampleRow, SnapshotRow

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'recloop.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(db_url: str):
    with Storage(db_url) as s:
        yield s


def _manifest(applied: int = 10) -> dict:
    return {
        "algorithm": "slateq",
        "config": {"gamma": 0.9, "hidden": [32]},
        "metrics": {"loss": 0.5, "q_mean": 1.25},
        "consumed_offsets": {"rec.transitions": {"0": applied, "1": 3}},
        "transitions_applied": applied,
    }


def _meta(policy: str, version: int, sha: str = "a") -> dict:
    return {
        "policy": policy,
        "algorithm": "mf",
        "version": version,
        "created_ts": T0.timestamp() + version,
        "weights_sha256": sha * 64,
        "manifest_sha256": "b" * 64,
        "path": f"/snap/{policy}/v{version:08d}",
        "manifest": {"nested": {"list": [1, 2.5, "x"], "none": None}},
        "consumed_offsets": {"rec.transitions": {"0": version * 10}},
        "transitions_applied": version * 10,
        "metrics": {"loss": 1.0 / (version + 1)},
    }


def test_migrations_build_exactly_the_models_schema(db_url):
    assert migrate(db_url) == head_revision()
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert {"snapshots", "runs", "outcomes", "samples", "alembic_version"} <= tables
    assert migrate(db_url) == head_revision()  # a second run changes nothing


def test_concurrent_migrations_from_several_processes_take_turns(db_url):
    # The demo starts several processes at once and each migrates first. Real processes
    # (a thread lock would hide a missing database lock), released together once each has
    # imported, so their migrations truly overlap; without the lock one of two fails.
    code = (
        "import sys; from recloop import storage; print('ready', flush=True); "
        "sys.stdin.readline(); print(storage.migrate(sys.argv[1]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, db_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == [head_revision()] * 2


def test_sqlite_uses_wal(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_storage_is_a_snapshot_store(store):
    assert isinstance(store, SnapshotStore)


def test_snapshot_written_recorded_and_verified_from_its_row(store, tmp_path):
    item_emb_ND = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
    ref = write_snapshot(tmp_path / "snaps", "slateq", 1, {"item_emb_ND": item_emb_ND}, _manifest())
    store.record_snapshot(ref.meta())

    row = store.latest_snapshot("slateq")
    assert row is not None
    assert (row["policy"], row["algorithm"], row["version"]) == ("slateq", "slateq", 1)
    assert row["consumed_offsets"] == {"rec.transitions": {"0": 10, "1": 3}}
    assert row["transitions_applied"] == 10
    assert row["metrics"] == {"loss": 0.5, "q_mean": 1.25}
    assert row["manifest"] == ref.manifest
    assert row["created"].tzinfo is not None
    assert abs(row["created_ts"] - ref.created_ts) < 1e-3
    # Serving's path: hashes from the database, files from disk.
    tensors, manifest = read_snapshot(row["path"], row["weights_sha256"], row["manifest_sha256"])
    np.testing.assert_array_equal(tensors["item_emb_ND"], item_emb_ND)
    assert manifest["version"] == 1


def test_latest_and_list_order_by_version_per_policy(store):
    for version in (3, 1, 7, 2):
        store.record_snapshot(_meta("a", version))
    store.record_snapshot(_meta("b", 100))

    assert store.latest_snapshot("a")["version"] == 7
    assert [r["version"] for r in store.list_snapshots("a")] == [1, 2, 3, 7]
    assert [r["version"] for r in store.list_snapshots("b")] == [100]
    assert store.latest_snapshot("nobody") is None
    assert store.list_snapshots("nobody") == []
    assert store.snapshot_policies() == ["a", "b"]
    row = store.list_snapshots("a")[0]
    assert row["manifest"] == {"nested": {"list": [1, 2.5, "x"], "none": None}}
    assert row["created"] == T0 + timedelta(seconds=1)


def test_recording_twice_is_idempotent_but_a_different_snapshot_conflicts(store):
    store.record_snapshot(_meta("a", 1))
    store.record_snapshot(_meta("a", 1))  # a learner retrying after a crash
    with pytest.raises(SnapshotConflict, match="v1"):
        store.record_snapshot(_meta("a", 1, sha="c"))
    rows = store.list_snapshots("a")
    assert len(rows) == 1 and rows[0]["weights_sha256"] == "a" * 64


def test_database_enforces_unique_policy_version(store):
    # The constraint itself, not only the store's check, keeps two writers honest.
    with Session(store.engine) as session:
        session.add(_row("a", 5))
        session.commit()
        session.add(_row("a", 5))
        with pytest.raises(IntegrityError):
            session.commit()


def _row(policy: str, version: int) -> SnapshotRow:
    return SnapshotRow(
        policy=policy,
        algorithm="mf",
        version=version,
        created=T0,
        weights_sha256="a" * 64,
        manifest_sha256="b" * 64,
        path="/x",
        manifest={},
        consumed_offsets={},
        transitions_applied=0,
        metrics={},
    )


def test_bad_snapshot_meta_is_refused(store):
    with pytest.raises(ValueError, match="lacks"):
        store.record_snapshot({"policy": "a", "version": 1})
    meta = _meta("a", 1)
    meta["metrics"] = {"loss": float("nan")}
    with pytest.raises(ValueError, match="metrics is not plain finite JSON"):
        store.record_snapshot(meta)
    with pytest.raises(ValueError, match="run config"):
        store.start_run({"lr": float("inf")})
    assert store.list_snapshots("a") == []


def test_data_survives_reopening(db_url):
    with Storage(db_url) as first:
        first.record_snapshot(_meta("a", 4))
        run_id = first.start_run({"seed": 1})
    with Storage(db_url) as second:
        assert second.latest_snapshot("a")["version"] == 4
        assert second.get_run(run_id)["config"] == {"seed": 1}


def test_runs_start_end_and_unknown_ids(store):
    run_id = store.start_run({"algo": "slateq", "k": 5}, notes="smoke", started=T0)
    run = store.get_run(run_id)
    assert run == {
        "id": run_id,
        "started": T0,
        "ended": None,
        "config": {"algo": "slateq", "k": 5},
        "notes": "smoke",
    }
    store.end_run(run_id, ended=T0 + timedelta(minutes=3))
    assert store.get_run(run_id)["ended"] == T0 + timedelta(minutes=3)

    assert store.start_run({}, run_id="named") == "named"
    with pytest.raises(StorageError, match="already exists"):
        store.start_run({}, run_id="named")
    with pytest.raises(StorageError, match="no run"):
        store.end_run("missing")
    with pytest.raises(ValueError, match="timezone"):
        store.start_run({}, started=datetime(2025, 1, 1))


def _outcome(policy: str, version: int, minute: int, mean_return: float) -> Outcome:
    return Outcome(
        policy=policy,
        version=version,
        window_start=T0 + timedelta(minutes=minute),
        window_end=T0 + timedelta(minutes=minute + 1),
        episodes=10 + version,
        mean_return=mean_return,
        ctr=0.25,
        clicked_quality=0.5,
        served_slates=100,
        return_sd=1.5 + version,
    )


def test_outcome_series_in_time_order(store):
    run_id = store.start_run({})
    other = store.start_run({})
    given = [
        _outcome("slateq", 2, minute=2, mean_return=5.0),
        _outcome("random", 0, minute=0, mean_return=3.0),
        _outcome("slateq", 1, minute=0, mean_return=3.5),
        _outcome("random", 0, minute=2, mean_return=2.9),
    ]
    assert store.record_outcomes(run_id, given) == 4
    store.record_outcomes(other, [_outcome("x", 1, 0, 1.0)])

    series = store.outcome_series(run_id)
    assert [(o.window_start.minute, o.policy, o.version) for o in series] == [
        (0, "random", 0),
        (0, "slateq", 1),
        (2, "random", 0),
        (2, "slateq", 2),
    ]
    assert series[3] == given[0]  # every field round-trips, timestamps as aware UTC
    assert [o.mean_return for o in store.outcome_series(run_id, policy="slateq")] == [3.5, 5.0]
    # A window recorded without its spread (as before migration 0002) reads back as unknown.
    store.record_outcomes(other, [replace(_outcome("y", 1, 0, 1.0), return_sd=None)])
    assert [o.return_sd for o in store.outcome_series(other, policy="y")] == [None]


def test_outcomes_refuse_unknown_runs_and_non_finite_values(store):
    with pytest.raises(StorageError, match="no run"):
        store.record_outcomes("missing", [_outcome("a", 1, 0, 1.0)])
    run_id = store.start_run({})
    with pytest.raises(ValueError, match="mean_return"):
        store.record_outcomes(run_id, [_outcome("a", 1, 0, float("nan"))])
    assert store.outcome_series(run_id) == []


def test_samples_by_name_and_labels_in_time_order(store):
    run_id = store.start_run({})
    plus2 = timezone(timedelta(hours=2))
    samples = [
        Sample(ts=T0 + timedelta(seconds=2), name="lag_messages", value=40.0, labels={"p": "0"}),
        Sample(ts=T0.timestamp(), name="lag_messages", value=10.0, labels={"p": "0"}),
        Sample(
            ts=(T0 + timedelta(seconds=1)).astimezone(plus2),
            name="lag_messages",
            value=7.0,
            labels={"p": "1"},
        ),
        Sample(ts=T0, name="freshness_s", value=1.5),
    ]
    assert store.record_samples(run_id, samples) == 4

    lag = store.samples(run_id, "lag_messages")
    assert [(s.ts, s.value) for s in lag] == [
        (T0, 10.0),
        (T0 + timedelta(seconds=1), 7.0),
        (T0 + timedelta(seconds=2), 40.0),
    ]
    assert all(s.ts.tzinfo is not None for s in lag)
    assert [s.value for s in store.samples(run_id, "lag_messages", labels={"p": "0"})] == [10, 40]
    assert store.samples(run_id, "freshness_s") == [
        Sample(ts=T0, name="freshness_s", value=1.5, labels={})
    ]
    assert store.samples(run_id, "absent") == []
    with pytest.raises(ValueError, match="must be finite"):
        store.record_samples(run_id, [Sample(ts=T0, name="x", value=float("inf"))])
    with pytest.raises(StorageError, match="no run"):
        store.record_samples("missing", samples)


def test_concurrent_writers_lose_nothing(db_url):
    stores = [Storage(db_url), Storage(db_url)]
    run_id = stores[0].start_run({})
    errors: list[Exception] = []

    def write(store: Storage, writer: int) -> None:
        try:
            for i in range(25):
                sample = Sample(ts=T0 + timedelta(seconds=i), name="eps", value=float(writer))
                store.record_samples(run_id, [sample])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with Session(stores[0].engine) as session:
        count = session.scalar(select(func.count()).select_from(SampleRow))
    for s in stores:
        s.close()
    assert errors == []
    assert count == 50


@pytest.fixture
def cli():
    app, bench = typer.Typer(), typer.Typer()
    db_cli.register(app, bench)
    # A wide terminal, so rich does not wrap the lines the assertions look for.
    runner = CliRunner(env={"COLUMNS": "200"})
    return lambda *args, **kw: runner.invoke(app, ["db", *args], **kw)


def test_cli_upgrade_then_list_snapshots(cli, db_url):
    result = cli("upgrade", "--url", db_url)
    assert result.exit_code == 0, result.output
    assert f"upgraded from empty to revision {head_revision()}" in result.output
    assert "already at" in cli("upgrade", "--url", db_url).output

    with Storage(db_url, migrate=False) as store:
        for version in (2, 1):
            store.record_snapshot(_meta("slateq", version))
    result = cli("snapshots", "--policy", "slateq", "--url", db_url, "--json")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and '"version": 1' in lines[0] and '"version": 2' in lines[1]

    table = cli("snapshots", "--policy", "slateq", "--url", db_url)
    assert table.exit_code == 0 and "/snap/slateq/v00000002" in table.output
    missing = cli("snapshots", "--policy", "other", "--url", db_url)
    assert missing.exit_code == 0 and "policies with some: slateq" in missing.output


def test_cli_uses_database_url_from_the_environment(cli, tmp_path):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    result = cli("upgrade", env={"DATABASE_URL": url, "RECLOOP_DATABASE_URL": None})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "env.db").exists()


def test_cli_errors_are_clear(cli, tmp_path):
    absent = tmp_path / "absent" / "x.db"
    result = cli("snapshots", "--policy", "a", "--url", f"sqlite:///{absent}")
    assert result.exit_code == 1 and "recloop db upgrade" in result.output
    assert not absent.parent.exists()  # listing created nothing

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    make_engine(empty).dispose()
    with make_engine(empty).connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.commit()
    result = cli("snapshots", "--policy", "a", "--url", empty)
    assert result.exit_code == 1 and "schema revision none" in result.output

    result = cli("snapshots", "--policy", "a", "--url", "nosuchdb://x")
    assert result.exit_code == 2 and "not a usable database URL" in result.output
    assert cli("snapshots", "--url", empty).exit_code == 2  # --policy is required
