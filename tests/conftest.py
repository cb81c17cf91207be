"""Shared fixtures: one real Kafka broker per test session, and per-test topic sets on it.

``kafka_broker`` starts a ``LocalBroker`` (the same code as ``recloop kafka up``) on free
loopback ports, with the quick-start JIT (a test session's broker lives minutes, not days).
The JVM is stopped by the fixture's teardown; as belts and braces an atexit hook stops it
too, and Linux's parent-death signal ends it if pytest itself is killed. If the broker cannot
start, every test that needs it errors: the integration tier fails, it never skips.

``kafka_settings`` gives each test a unique topic prefix on that broker with every topic of
the table created, and deletes them afterwards so a long session keeps the broker small.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import time
import uuid
from collections.abc import Iterator

import pytest

from recloop.core.settings import Settings
from recloop.kafka.admin import create_topics, delete_topics
from recloop.ops.broker import LocalBroker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), die_with_parent=True, quick_start=True)
    atexit.register(broker.stop)
    try:
        t0 = time.monotonic()
        broker.start()
        print(f"\nKafka broker ready on {broker.bootstrap} in {time.monotonic() - t0:.1f} s")
        yield broker
    finally:
        broker.stop()
        atexit.unregister(broker.stop)


def _topic_prefix(nodeid: str) -> str:
    # Readable in broker logs, unique across tests and reruns, legal in topic names.
    name = re.sub(r"[^a-zA-Z0-9]+", "-", nodeid.rsplit("::", 1)[-1]).strip("-")[:40]
    return f"{name}-{uuid.uuid4().hex[:8]}."


@pytest.fixture
def kafka_settings(
    kafka_broker: LocalBroker, request: pytest.FixtureRequest, tmp_path
) -> Iterator[Settings]:
    settings = Settings(
        kafka_bootstrap=kafka_broker.bootstrap,
        topic_prefix=_topic_prefix(request.node.nodeid),
        partitions=4,
        home=tmp_path,
    )
    create_topics(settings)
    yield settings
    if kafka_broker.is_alive():
        # Best effort: a failed deletion must not hide the test's own result.
        with contextlib.suppress(Exception):
            delete_topics(settings, timeout=10)
