"""Fixtures for the integration tier beyond the session broker: a real PostgreSQL server, and
a broker of a test's own for tests that kill it (``own_broker``).

``postgres_server`` starts one server for the whole session and stops it (by pid) at the
end, also when tests fail. Without the binaries the PostgreSQL tests fail when ``CI`` is set
(CI must run them) and are skipped only on a developer machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from recloop.ops.broker import LocalBroker
from tests.integration.postgres import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI must run the PostgreSQL tests: {exc}", pytrace=False)
        pytest.skip(f"{exc}\n(set CI=1 to make this a failure)")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL of a fresh, empty database on the session's server."""
    return postgres_server.create_database()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of the test's own, for tests that kill it (the session's broker stays up).
    Restart it from the test's main thread: its parent-death signal is bound to the thread
    that started it."""
    broker = LocalBroker(tmp_path / "kafka", die_with_parent=True, quick_start=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
