"""faust-streaming 0.15 + aiokafka 0.14 + Kafka 4.1 work together: a minimal app, for real.

The app below is the smallest shape recloop's stream processors take: an agent reads one
topic, keeps a count per key in a faust Table (so faust must create a compacted changelog
topic on the broker, which old aiokafka versions cannot do on Kafka 4), and writes every
record, decoded and re-encoded through ``recloop.core.codec``, to another topic with the running
count in a header. It runs as a real worker in a subprocess and is stopped at the end.
"""

from __future__ import annotations

import functools
import json
import operator
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import NewTopic

from recloop.core import codec, events
from recloop.core.settings import Settings
from recloop.kafka.clients import make_admin, make_consumer, make_producer
from tests.fixtures import example_events

pytestmark = pytest.mark.integration

ANY_RECORD = functools.reduce(operator.or_, events.ALL_RECORD_TYPES)
ROUNDS = 3
PARTITIONS = 4


def make_app(bootstrap: str, app_id: str, in_topic: str, out_topic: str, datadir: str):
    """The minimal faust app: relay every record and count them per key in a Table."""
    import faust

    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=datadir,
        web_enabled=False,
        topic_replication_factor=1,
        topic_partitions=PARTITIONS,
        consumer_auto_offset_reset="earliest",
    )
    source = app.topic(in_topic, key_serializer="raw", value_serializer="raw")
    sink = app.topic(out_topic, key_serializer="raw", value_serializer="raw")
    counts = app.Table("counts", default=int, partitions=PARTITIONS)

    @app.agent(source)
    async def relay(stream):  # type: ignore[no-untyped-def]
        async for event in stream.events():
            record = codec.decode(event.value, ANY_RECORD)
            key = event.key.decode()
            counts[key] += 1
            await sink.send(
                key=event.key,
                value=codec.encode(record),
                headers=[("count", str(counts[key]).encode())],
            )

    return app


def run_worker(bootstrap: str, app_id: str, in_topic: str, out_topic: str, datadir: str) -> None:
    """Subprocess entry point: run the app as a faust worker until SIGTERM."""
    import faust

    app = make_app(bootstrap, app_id, in_topic, out_topic, datadir)
    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


def _start_worker(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    code = f"from {__name__} import run_worker; run_worker(*{args!r})"
    root = Path(__file__).resolve().parents[2]
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], cwd=root, stdout=log, stderr=subprocess.STDOUT
        )


def _stop_worker(proc: subprocess.Popen[bytes]) -> bool:
    """SIGTERM, then SIGKILL if it has not exited within 30 s (its return code then says so).

    Returns whether it was still running when told to stop.
    """
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    return True


@pytest.mark.timeout(180)
def test_minimal_faust_app_relays_every_event_type_and_keeps_a_table(
    kafka_settings: Settings, tmp_path: Path
):
    prefix = kafka_settings.topic_prefix
    in_topic, out_topic, app_id = f"{prefix}faust.in", f"{prefix}faust.out", f"{prefix}app"
    admin = make_admin(kafka_settings)
    for fut in admin.create_topics(
        [
            NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
            for t in (in_topic, out_topic)
        ]
    ).values():
        fut.result()

    rounds = [example_events(ts=1_700_000_000.0 + r) for r in range(ROUNDS)]
    producer = make_producer(kafka_settings)
    for batch in rounds:
        for record in batch:
            producer.produce(
                in_topic, key=type(record).__name__.encode(), value=codec.encode(record)
            )
    assert producer.flush(10) == 0
    total = sum(len(b) for b in rounds)

    log_path = tmp_path / "faust-worker.log"
    worker = _start_worker(
        [kafka_settings.kafka_bootstrap, app_id, in_topic, out_topic, str(tmp_path / "faust")],
        log_path,
    )
    try:
        out = _consume(kafka_settings, out_topic, total, worker, log_path, timeout=120)
        changelog = _latest_by_key(kafka_settings, f"{app_id}-counts-changelog", len(rounds[0]))
    finally:
        was_running = _stop_worker(worker)
    # It ran to the end and then shut down cleanly on SIGTERM within the wait: not dead
    # before, not killed (-9), not crashed on the way out.
    assert was_running and worker.returncode == 0, log_path.read_text()[-4000:]

    # Per key (record type) order is kept: each type comes back in the order sent, equal,
    # with the table's running count 1, 2, 3.
    by_type: dict[str, list[tuple[events.Record, int]]] = defaultdict(list)
    for msg in out:
        record = codec.decode(msg.value(), ANY_RECORD)
        assert msg.key() == type(record).__name__.encode()
        by_type[type(record).__name__].append((record, int(dict(msg.headers())["count"])))
    expected = defaultdict(list)
    for batch in rounds:
        for record in batch:
            expected[type(record).__name__].append(record)
    assert set(by_type) == {t.__name__ for t in events.ALL_RECORD_TYPES}
    for name, got in by_type.items():
        assert [r for r, _ in got] == expected[name]
        assert [c for _, c in got] == list(range(1, ROUNDS + 1))

    # The table lives on the broker too: faust's compacted changelog holds the final counts.
    assert changelog == {t.__name__: ROUNDS for t in events.ALL_RECORD_TYPES}
    metadata = admin.list_topics(timeout=10).topics[f"{app_id}-counts-changelog"]
    assert len(metadata.partitions) == PARTITIONS


def _consume(settings, topic, want, worker, log_path, timeout):  # type: ignore[no-untyped-def]
    consumer = make_consumer(settings, f"{settings.topic_prefix}check")
    consumer.subscribe([topic])
    out = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < want and time.monotonic() < deadline:
            assert worker.poll() is None, "faust worker died:\n" + log_path.read_text()[-4000:]
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                continue
            out.append(msg)
    finally:
        consumer.close()
    assert len(out) == want, (
        f"got {len(out)} of {want} relayed records; worker log:\n{log_path.read_text()[-4000:]}"
    )
    return out


def _latest_by_key(settings, topic, want_keys, timeout=30.0):  # type: ignore[no-untyped-def]
    """Read a changelog to its end and keep the last value per key (what compaction keeps)."""
    consumer = make_consumer(settings, f"{settings.topic_prefix}changelog")
    consumer.subscribe([topic])
    latest: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if len(latest) == want_keys and all(v == ROUNDS for v in latest.values()):
                    break
                continue
            if msg.error() is not None:
                continue
            latest[json.loads(msg.key())] = json.loads(msg.value())
    finally:
        consumer.close()
    return latest
