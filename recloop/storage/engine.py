"""Engines from a URL: SQLite (the default, in WAL mode) or PostgreSQL through psycopg 3."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

# How long a SQLite writer waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0


def normalise_url(url: str | URL) -> URL:
    """Parse ``url``; bare ``postgres://``/``postgresql://`` get the psycopg 3 driver.

    Compose files and hosted databases hand out ``postgresql://`` URLs, for which SQLAlchemy
    would pick psycopg2, which recloop does not install.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url``; a SQLite file's directory is created if it is missing."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    return create_engine(parsed, pool_pre_ping=True, json_serializer=_strict_json)


def _strict_json(value: object) -> str:
    # PostgreSQL refuses NaN/Infinity in JSON; refuse them on SQLite too, so both agree.
    return json.dumps(value, allow_nan=False)


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, json_serializer=_strict_json
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_conn.cursor()
        # WAL lets serving and dashboards read while the learner writes; SQLite leaves
        # foreign keys off unless asked on every connection.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine
