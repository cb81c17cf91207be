"""``Storage``: the one object processes use to read and write recloop's database.

It implements ``recloop.core.ports.SnapshotStore`` (snapshot metadata as plain dicts) and keeps the
experiment ledger the dashboards read: runs, per-version outcomes and metric time series.
Timestamps go in as aware datetimes or Unix seconds and always come out as aware UTC
datetimes, whichever backend is underneath.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from recloop.core.settings import Settings
from recloop.storage.engine import make_engine
from recloop.storage.models import OutcomeRow, RunRow, SampleRow, SnapshotRow
from recloop.storage.schema import migrate as _migrate

Timestamp = datetime | float


class StorageError(Exception):
    """A request the database cannot honour (an unknown run, say)."""


class SnapshotConflict(StorageError):
    """A different snapshot is already recorded under the same policy and version."""


@dataclass(frozen=True)
class Outcome:
    """What slates served by ``policy`` version ``version`` achieved in one window."""

    policy: str
    version: int
    window_start: datetime
    window_end: datetime
    episodes: int  # sessions that ended in the window
    mean_return: float  # mean session return of those episodes
    ctr: float  # clicks per served slate
    clicked_quality: float  # mean quality of clicked items
    served_slates: int
    return_sd: float | None = None  # sample SD of those episodes' returns (None: not recorded)


@dataclass(frozen=True)
class Sample:
    """One point of the time series ``name`` (e.g. ``learner_lag_messages``)."""

    ts: datetime
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


class Storage:
    """Snapshot metadata and the experiment ledger in one SQL database.

    ``url`` is any SQLAlchemy URL: ``sqlite:///path/recloop.db`` (WAL mode) or
    ``postgresql+psycopg://user@host/db``. With ``migrate=True`` (the default) the schema
    is brought to the latest migration first.
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.engine: Engine = make_engine(url)
        if migrate:
            _migrate(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, migrate: bool = True) -> Storage:
        """The storage a process's settings name (``DATABASE_URL`` or the SQLite default)."""
        return cls(settings.resolved_database_url, migrate=migrate)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- snapshots (recloop.core.ports.SnapshotStore) ------------------------------------------

    def record_snapshot(self, meta: dict) -> None:
        """Record a snapshot (``recloop.core.snapshot.SnapshotRef.meta()`` gives the dict).

        Recording the same snapshot again is a no-op, so a learner that crashed between
        writing and recording can simply record again; a *different* snapshot under an
        existing (policy, version) raises ``SnapshotConflict``.
        """
        row = _snapshot_row(meta)
        try:
            with self._session.begin() as session:
                session.add(row)
        except IntegrityError:
            existing = self._snapshot(row.policy, row.version)
            if existing is None:
                raise
            if (existing.weights_sha256, existing.manifest_sha256) != (
                row.weights_sha256,
                row.manifest_sha256,
            ):
                raise SnapshotConflict(
                    f"snapshot {row.policy} v{row.version} is already recorded with other hashes"
                ) from None

    def latest_snapshot(self, policy: str) -> dict | None:
        """The highest-versioned recorded snapshot of ``policy``, or ``None``."""
        query = (
            select(SnapshotRow)
            .where(SnapshotRow.policy == policy)
            .order_by(SnapshotRow.version.desc())
            .limit(1)
        )
        with self._session() as session:
            row = session.scalars(query).first()
        return None if row is None else _snapshot_dict(row)

    def snapshot(self, policy: str, version: int) -> dict | None:
        """The record of ``policy`` version ``version``, or ``None`` if it was never recorded."""
        row = self._snapshot(policy, version)
        return None if row is None else _snapshot_dict(row)

    def list_snapshots(self, policy: str) -> list[dict]:
        """Every recorded snapshot of ``policy``, oldest version first."""
        query = (
            select(SnapshotRow).where(SnapshotRow.policy == policy).order_by(SnapshotRow.version)
        )
        with self._session() as session:
            return [_snapshot_dict(row) for row in session.scalars(query)]

    def snapshot_policies(self) -> list[str]:
        """The names of all policies with at least one recorded snapshot, sorted."""
        query = select(SnapshotRow.policy).distinct().order_by(SnapshotRow.policy)
        with self._session() as session:
            return list(session.scalars(query))

    def _snapshot(self, policy: str, version: int) -> SnapshotRow | None:
        query = select(SnapshotRow).where(
            SnapshotRow.policy == policy, SnapshotRow.version == version
        )
        with self._session() as session:
            return session.scalars(query).first()

    # -- experiment runs -------------------------------------------------------------

    def start_run(
        self,
        config: Mapping[str, Any],
        notes: str = "",
        *,
        run_id: str | None = None,
        started: Timestamp | None = None,
    ) -> str:
        """Open an experiment run and return its id (a fresh UUID unless ``run_id`` is given)."""
        run_id = run_id or uuid.uuid4().hex
        row = RunRow(
            id=run_id,
            started=_utc(started),
            ended=None,
            config=_json(dict(config), "run config"),
            notes=notes,
        )
        try:
            with self._session.begin() as session:
                session.add(row)
        except IntegrityError:
            raise StorageError(f"run {run_id!r} already exists") from None
        return run_id

    def end_run(self, run_id: str, ended: Timestamp | None = None) -> None:
        """Mark run ``run_id`` as finished."""
        with self._session.begin() as session:
            self._run(session, run_id).ended = _utc(ended)

    def latest_run_id(self) -> str | None:
        """The most recently started run, or ``None`` when there is none."""
        query = select(RunRow.id).order_by(RunRow.started.desc()).limit(1)
        with self._session() as session:
            return session.scalars(query).first()

    def get_run(self, run_id: str) -> dict[str, Any]:
        """Run ``run_id`` as a dict: id, started, ended (``None`` while running), config, notes."""
        with self._session() as session:
            row = self._run(session, run_id)
            return {
                "id": row.id,
                "started": _from_db(row.started),
                "ended": None if row.ended is None else _from_db(row.ended),
                "config": row.config,
                "notes": row.notes,
            }

    @staticmethod
    def _run(session: Session, run_id: str) -> RunRow:
        row = session.get(RunRow, run_id)
        if row is None:
            raise StorageError(f"no run {run_id!r}; start it with start_run first")
        return row

    # -- dashboard metrics -------------------------------------------------------------

    def record_outcomes(self, run_id: str, outcomes: Iterable[Outcome]) -> int:
        """Append per-version outcome windows to run ``run_id``; return how many."""
        rows = [_outcome_row(run_id, outcome) for outcome in outcomes]
        with self._session.begin() as session:
            self._run(session, run_id)
            session.add_all(rows)
        return len(rows)

    def outcome_series(self, run_id: str, policy: str | None = None) -> list[Outcome]:
        """Run ``run_id``'s outcome windows in time order (of one ``policy`` if given)."""
        query = select(OutcomeRow).where(OutcomeRow.run_id == run_id)
        if policy is not None:
            query = query.where(OutcomeRow.policy == policy)
        query = query.order_by(
            OutcomeRow.window_end, OutcomeRow.policy, OutcomeRow.version, OutcomeRow.id
        )
        with self._session() as session:
            return [_outcome(row) for row in session.scalars(query)]

    def record_samples(self, run_id: str, samples: Iterable[Sample]) -> int:
        """Append time-series samples to run ``run_id``; return how many."""
        rows = [
            SampleRow(
                run_id=run_id,
                ts=_utc(sample.ts),
                name=sample.name,
                labels=_json(dict(sample.labels), "sample labels"),
                value=_finite(sample.value, sample.name),
            )
            for sample in samples
        ]
        with self._session.begin() as session:
            self._run(session, run_id)
            session.add_all(rows)
        return len(rows)

    def samples(
        self, run_id: str, name: str, labels: Mapping[str, str] | None = None
    ) -> list[Sample]:
        """Run ``run_id``'s samples of series ``name`` in time order.

        With ``labels``, only samples whose labels include all of those pairs.
        """
        query = (
            select(SampleRow)
            .where(SampleRow.run_id == run_id, SampleRow.name == name)
            .order_by(SampleRow.ts, SampleRow.id)
        )
        wanted = dict(labels or {})
        with self._session() as session:
            rows = list(session.scalars(query))
        return [
            Sample(ts=_from_db(row.ts), name=row.name, value=row.value, labels=row.labels)
            for row in rows
            if wanted.items() <= row.labels.items()
        ]


def _snapshot_row(meta: Mapping[str, Any]) -> SnapshotRow:
    missing = [
        key
        for key in ("policy", "algorithm", "version", "weights_sha256", "manifest_sha256", "path")
        if key not in meta
    ]
    if missing:
        raise ValueError(f"snapshot meta lacks {missing}")
    manifest = dict(meta.get("manifest", {}))
    created = meta.get("created", meta.get("created_ts", manifest.get("created_ts")))
    return SnapshotRow(
        policy=str(meta["policy"]),
        algorithm=str(meta["algorithm"]),
        version=int(meta["version"]),
        created=_utc(created),
        weights_sha256=str(meta["weights_sha256"]),
        manifest_sha256=str(meta["manifest_sha256"]),
        path=str(meta["path"]),
        manifest=_json(manifest, "manifest"),
        consumed_offsets=_json(
            dict(meta.get("consumed_offsets", manifest.get("consumed_offsets", {}))),
            "consumed_offsets",
        ),
        transitions_applied=int(
            meta.get("transitions_applied", manifest.get("transitions_applied", 0))
        ),
        metrics=_json(dict(meta.get("metrics", manifest.get("metrics", {}))), "metrics"),
    )


def _snapshot_dict(row: SnapshotRow) -> dict[str, Any]:
    created = _from_db(row.created)
    return {
        "policy": row.policy,
        "algorithm": row.algorithm,
        "version": row.version,
        "created": created,
        "created_ts": created.timestamp(),
        "weights_sha256": row.weights_sha256,
        "manifest_sha256": row.manifest_sha256,
        "path": row.path,
        "manifest": row.manifest,
        "consumed_offsets": row.consumed_offsets,
        "transitions_applied": row.transitions_applied,
        "metrics": row.metrics,
    }


def _outcome_row(run_id: str, o: Outcome) -> OutcomeRow:
    return OutcomeRow(
        run_id=run_id,
        policy=o.policy,
        version=int(o.version),
        window_start=_utc(o.window_start),
        window_end=_utc(o.window_end),
        episodes=int(o.episodes),
        mean_return=_finite(o.mean_return, "mean_return"),
        ctr=_finite(o.ctr, "ctr"),
        clicked_quality=_finite(o.clicked_quality, "clicked_quality"),
        served_slates=int(o.served_slates),
        return_sd=None if o.return_sd is None else _finite(o.return_sd, "return_sd"),
    )


def _outcome(row: OutcomeRow) -> Outcome:
    return Outcome(
        policy=row.policy,
        version=row.version,
        window_start=_from_db(row.window_start),
        window_end=_from_db(row.window_end),
        episodes=row.episodes,
        mean_return=row.mean_return,
        ctr=row.ctr,
        clicked_quality=row.clicked_quality,
        served_slates=row.served_slates,
        return_sd=row.return_sd,
    )


def _utc(value: Timestamp | None) -> datetime:
    """``value`` (aware datetime or Unix seconds; ``None`` for now) as an aware UTC datetime."""
    if value is None:
        return datetime.now(UTC)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value!r} has no timezone; pass an aware datetime")
        return value.astimezone(UTC)
    return datetime.fromtimestamp(float(value), UTC)


def _from_db(value: datetime) -> datetime:
    # SQLite keeps no zone; every value was converted to UTC before it was written.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json(value: dict[str, Any], what: str) -> dict[str, Any]:
    # Checked here so both backends refuse the same values with the same error: PostgreSQL
    # rejects NaN/Infinity in JSON, SQLite would store them as non-standard text.
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not plain finite JSON: {exc}") from exc
    return value


def _finite(value: float, what: str) -> float:
    # SQLite would store NaN as NULL and PostgreSQL as NaN: refuse it on both alike.
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value
