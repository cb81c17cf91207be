"""Applying the alembic migrations in ``recloop/storage/migrations``, safe from many processes.

The demo starts several processes against one database at once, and each may call
``migrate``; a lock (a PostgreSQL advisory lock, or a lock file beside a SQLite database)
makes them take turns, so the first upgrades and the others find the schema at head.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from recloop.storage.engine import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any fixed 64-bit number; it names recloop's migration lock among advisory locks.
_PG_LOCK_KEY = 0x7265636C6F6F70  # "recloop"
# alembic's ``context``/``op`` are module-level proxies: two threads must never migrate at
# once, not even two different databases.
_ALEMBIC_LOCK = threading.Lock()


def alembic_config() -> Config:
    """An alembic configuration pointing at the packaged migrations (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """The newest revision the shipped migrations define."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "storage/migrations/versions holds no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database behind ``engine`` is at (``None`` if never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(url_or_engine: str | Engine, revision: str = "head") -> str | None:
    """Upgrade the database to ``revision`` (the latest by default); return where it ends up."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with _migration_lock(engine) as conn, _ALEMBIC_LOCK:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
        return current_revision(engine)
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()  # leave any failed migration transaction first
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        with engine.connect() as conn:
            yield conn
        return
    lock_path = Path(database).expanduser().with_name(Path(database).name + ".migrate-lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
