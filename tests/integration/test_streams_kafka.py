"""The streams worker on the real broker: exact transitions, crash recovery, scale-out, DLQ.

Every worker runs as its own process, started with the ``recloop streams`` command line as in
production, with a unique app id and data dir; the ``workers`` fixture kills each one by pid
at the end, also when a test fails. Expected transitions come from folding the same events in causal order
with the pure fold, so "exactly" means: the same ids with the same content, none missing,
none duplicated (after a kill -9, re-emissions must repeat an id with identical content).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Message

from recloop.core import codec
from recloop.core.dlq import (
    HEADER_ERROR,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    parse_headers,
)
from recloop.core.events import Record, Transition
from recloop.core.settings import Settings
from recloop.kafka.clients import (
    DeliveryTracker,
    flush_or_raise,
    make_consumer,
    make_producer,
    produce_records,
)
from recloop.streams import fold
from recloop.streams.synthetic import SyntheticConfig, causal_events, split_topics

pytestmark = pytest.mark.integration

WORKLOAD = SyntheticConfig(users=40, sessions=2, steps=3, seed=7)


class Workers:
    """Starts streams workers as subprocesses and stops every one of them by pid."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(
        self, settings: Settings, app_id: str, name: str, entry: tuple[str, ...] = ("-m", "recloop")
    ) -> subprocess.Popen:
        """Start a worker; ``entry`` is what runs ``recloop``'s command line (a test's own
        ``-c`` prelude may put a fault into the worker before it calls ``recloop.cli.main``)."""
        env = {
            **os.environ,
            "RECLOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "RECLOOP_TOPIC_PREFIX": settings.topic_prefix,
            "RECLOOP_PARTITIONS": str(settings.partitions),
            "RECLOOP_METRICS_PORT": "0",  # two workers in one test would share the port
        }
        log = open(self.tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        cmd = [
            sys.executable, *entry, "streams", "--no-create",  # the fixture made them
            "--app-id", app_id, "--data-dir", str(self.tmp_path / name),
            "--batch-within", "0.02",
            "--session-timeout", "1e9",  # synthetic timestamps are years old
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(15)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in self.tmp_path.glob("*.log"))


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.stop_all()


def produce(settings: Settings, events: list[Record]) -> None:
    slates, feedback = split_topics(events)
    producer, tracker = make_producer(settings), DeliveryTracker()
    produce_records(producer, settings.topics.slates, slates, lambda r: r.user_id, tracker)
    produce_records(producer, settings.topics.feedback, feedback, lambda r: r.user_id, tracker)
    flush_or_raise(producer, tracker)


def produce_raw(
    settings: Settings, topic: str, messages: list[tuple[bytes, bytes]]
) -> list[tuple[int, int]]:
    """Produce ``messages`` as they are; return where each landed, (partition, offset), in order.

    The places come from the broker's delivery reports, so a test can hold a dead letter's
    source headers to the exact record they name.
    """
    producer, tracker = make_producer(settings), DeliveryTracker()
    placed: dict[int, tuple[int, int]] = {}

    def on_delivery(i: int, err: KafkaError | None, msg: Message) -> None:
        tracker(err, msg)
        if err is None:
            placed[i] = (msg.partition(), msg.offset())

    for i, (key, value) in enumerate(messages):
        producer.produce(topic, value=value, key=key, on_delivery=partial(on_delivery, i))
    flush_or_raise(producer, tracker)
    return [placed[i] for i in range(len(messages))]


class TransitionReader:
    """Reads ``rec.transitions`` from the start, keeping every copy of every transition."""

    def __init__(self, settings: Settings, group: str) -> None:
        self.consumer = make_consumer(settings, group)
        self.consumer.subscribe([settings.topics.transitions])
        self.copies: dict[str, list[bytes]] = defaultdict(list)
        self.partitions: dict[str, set[int]] = defaultdict(set)

    def read_until(self, want: set[str], timeout: float, settle: float = 2.0) -> None:
        """Read until every wanted id arrived, then ``settle`` more seconds for duplicates."""
        deadline = time.monotonic() + timeout
        done_at = None
        while time.monotonic() < (done_at or deadline):
            for msg in self.consumer.consume(500, 0.2):
                assert msg.error() is None, msg.error()
                t = codec.decode(msg.value(), Transition)
                self.copies[t.transition_id].append(msg.value())
                self.partitions[t.user_id].add(msg.partition())
            if done_at is None and want <= set(self.copies):
                done_at = time.monotonic() + settle

    def close(self) -> None:
        self.consumer.close()


def expected(events: list[Record]) -> dict[str, bytes]:
    states: dict = {}
    out = {}
    for event in events:
        states[event.user_id], more = fold.apply(states.get(event.user_id), event)
        out.update((t.transition_id, codec.encode(t)) for t in more)
    return out


def assert_exactly(reader: TransitionReader, want: dict[str, bytes], workers: Workers) -> None:
    got = set(reader.copies)
    missing, extra = set(want) - got, got - set(want)
    assert not missing and not extra, (
        f"{len(missing)} missing, {len(extra)} unexpected\n{workers.logs()}"
    )
    for tid, copies in reader.copies.items():
        assert all(c == want[tid] for c in copies), f"transition {tid} differs from the fold's"
    # A user's transitions all land on one partition (co-partitioned with their input).
    assert all(len(parts) == 1 for parts in reader.partitions.values())


def test_n_users_in_exactly_the_expected_transitions_out(kafka_settings, workers):
    events = causal_events(WORKLOAD)
    want = expected(events)
    assert len(want) == WORKLOAD.users * WORKLOAD.sessions * WORKLOAD.steps
    produce(kafka_settings, events)
    workers.start(kafka_settings, f"{kafka_settings.topic_prefix}streams", "w1")
    reader = TransitionReader(kafka_settings, "check")
    try:
        reader.read_until(set(want), timeout=60)
    finally:
        reader.close()
    assert_exactly(reader, want, workers)
    assert all(len(c) == 1 for c in reader.copies.values()), "duplicates without any failure"


def test_kill_9_and_restart_recovers_state_from_the_changelog(kafka_settings, workers):
    events = causal_events(WORKLOAD)
    want = expected(events)
    half = len(events) // 2
    app_id = f"{kafka_settings.topic_prefix}streams"
    produce(kafka_settings, events[:half])
    first = workers.start(kafka_settings, app_id, "before-kill")
    reader = TransitionReader(kafka_settings, "check")
    try:
        # Kill it mid-stream: once some, but not all, of the first half's transitions are out.
        deadline = time.monotonic() + 60
        while len(reader.copies) < 20 and time.monotonic() < deadline:
            reader.read_until(set(want), timeout=0.5, settle=0)
        assert len(reader.copies) >= 20, workers.logs()
        # Make sure the worker has committed offsets, so the restart resumes mid-stream and
        # must take the open sessions' state from the changelog rather than re-fold it all.
        wait_for_committed_offsets(kafka_settings, app_id, timeout=30)
        produce(kafka_settings, events[half : half + half // 2])  # more arrives as it dies
        workers.kill(first)
        produce(kafka_settings, events[half + half // 2 :])
        workers.start(kafka_settings, app_id, "after-restart")
        reader.read_until(set(want), timeout=60)
    finally:
        reader.close()
    assert_exactly(reader, want, workers)


def wait_for_committed_offsets(settings: Settings, group: str, timeout: float) -> None:
    from confluent_kafka import TopicPartition

    probe = make_consumer(settings, group)  # never subscribes, so it never joins the group
    tps = [TopicPartition(settings.topics.feedback, p) for p in range(settings.partitions)]
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(tp.offset > 0 for tp in probe.committed(tps, timeout=10)):
                return
            time.sleep(0.5)
    finally:
        probe.close()
    raise AssertionError(f"group {group} committed no offsets within {timeout} s")


def test_two_workers_split_the_partitions_and_give_the_same_transitions(kafka_settings, workers):
    events = causal_events(WORKLOAD)
    want = expected(events)
    app_id = f"{kafka_settings.topic_prefix}streams"
    produce(kafka_settings, events)
    a = workers.start(kafka_settings, app_id, "worker-a")
    b = workers.start(kafka_settings, app_id, "worker-b")
    reader = TransitionReader(kafka_settings, "check")
    try:
        reader.read_until(set(want), timeout=60)
    finally:
        reader.close()
    assert a.poll() is None and b.poll() is None, workers.logs()
    assert_exactly(reader, want, workers)
    assert_two_members_share_the_partitions(kafka_settings, app_id)


def assert_two_members_share_the_partitions(settings: Settings, group: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())
    description = admin.describe_consumer_groups([group])[group].result(timeout=30)
    slates = settings.topics.slates
    owned = [
        {tp.partition for tp in m.assignment.topic_partitions if tp.topic == slates}
        for m in description.members
    ]
    assert len(owned) == 2 and all(owned), owned
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(settings.partitions))


def test_malformed_records_go_to_the_dlq_while_the_rest_flows(kafka_settings, workers):
    events = causal_events(SyntheticConfig(users=10, sessions=1, steps=2, seed=9))
    want = expected(events)
    bad = [(b"u1", b"{oops"), (b"u2", b'{"type":"Click","v":1}'), (b"u3", b"")]
    topics = kafka_settings.topics
    fb, sl = topics.feedback, topics.slates
    placed = [(fb, at) for at in produce_raw(kafka_settings, fb, bad[:2])]
    produce(kafka_settings, events)
    placed += [(sl, at) for at in produce_raw(kafka_settings, sl, bad[2:])]
    # Each bad record's (unique) key -> where it was written: what its dead letter must name.
    source = {key: where for (key, _), where in zip(bad, placed, strict=True)}
    workers.start(kafka_settings, f"{kafka_settings.topic_prefix}streams", "w1")
    reader = TransitionReader(kafka_settings, "check")
    try:
        reader.read_until(set(want), timeout=60)
    finally:
        reader.close()
    assert_exactly(reader, want, workers)

    dlq = make_consumer(kafka_settings, "dlq-check")
    dlq.subscribe([topics.dlq(topics.feedback), topics.dlq(topics.slates)])
    dead = []
    deadline = time.monotonic() + 30
    while len(dead) < len(bad) and time.monotonic() < deadline:
        dead += [m for m in dlq.consume(10, 0.5) if m.error() is None]
    dlq.close()
    assert sorted((m.key(), m.value() or b"") for m in dead) == sorted(bad)
    for m in dead:
        headers = parse_headers(m.headers())
        topic, (partition, offset) = source[m.key()]
        assert m.topic() == topics.dlq(topic) and headers[HEADER_TOPIC] == topic
        assert headers[HEADER_PARTITION] == str(partition)
        assert headers[HEADER_OFFSET] == str(offset)
        assert headers[HEADER_ERROR]
