"""``recloop lag`` agrees with Kafka's own ConsumerGroupCommand on the same broker and group.

The group is left with a known lag on every partition of one topic (some consumed in part,
one in full, one not at all), then both tools describe it. The CLI runs as a subprocess,
as an operator would run it, with only ``RECLOOP_KAFKA_BOOTSTRAP`` pointing it at the broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from confluent_kafka import TopicPartition

from recloop.core.settings import Settings
from recloop.kafka.clients import make_consumer, make_producer
from recloop.ops.broker import free_port
from tests.consumer_groups import describe_group

pytestmark = pytest.mark.integration

PRODUCED = (12, 7, 9, 5)  # messages written to partitions 0..3
COMMITTED = (5, 7, 3, 0)  # offsets the group commits: part, all, part, none


def _recloop(*args: str, bootstrap: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "RECLOOP_KAFKA_BOOTSTRAP": bootstrap,
        "COLUMNS": "200",  # rich wraps tables to the terminal; a pipe would get 80
    }
    return subprocess.run(
        [sys.executable, "-m", "recloop", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _leave_known_lag(settings: Settings, topic: str, group: str) -> None:
    producer = make_producer(settings)
    for partition, count in enumerate(PRODUCED):
        for i in range(count):
            producer.produce(
                topic, key=f"u{partition}".encode(), value=b"%d" % i, partition=partition
            )
    assert producer.flush(15) == 0

    consumer = make_consumer(settings, group)
    consumer.assign([TopicPartition(topic, p, 0) for p in range(len(PRODUCED))])
    seen: dict[int, list[int]] = {p: [] for p in range(len(PRODUCED))}
    deadline = time.monotonic() + 30
    while any(len(seen[p]) < COMMITTED[p] for p in seen) and time.monotonic() < deadline:
        for msg in consumer.consume(50, timeout=0.5):
            if not msg.error():
                seen[msg.partition()].append(msg.offset())
    for p, target in enumerate(COMMITTED):
        assert seen[p][:target] == list(range(target)), f"partition {p} read {seen[p]}"
    # Commit exactly the targets (offset = next record to read), whatever else was fetched.
    consumer.commit(
        offsets=[TopicPartition(topic, p, off) for p, off in enumerate(COMMITTED)],
        asynchronous=False,
    )
    consumer.close()


def test_recloop_lag_matches_consumer_group_command(kafka_settings: Settings, kafka_broker):
    topic = kafka_settings.topics.transitions
    group = f"lagtest-{kafka_settings.topic_prefix.rstrip('.')[-8:]}"
    t0 = time.time()
    _leave_known_lag(kafka_settings, topic, group)

    proc = _recloop("lag", "--json", "--group", group, bootstrap=kafka_broker.bootstrap)
    assert proc.returncode == 0, proc.stderr
    ours = {(r["topic"], r["partition"]): r for r in json.loads(proc.stdout)["partitions"]}
    theirs = {(r.topic, r.partition): r for r in describe_group(kafka_broker.bootstrap, group)}

    expected_keys = {(topic, p) for p in range(len(PRODUCED))}
    assert set(ours) == expected_keys
    assert set(theirs) == expected_keys
    for key in sorted(expected_keys):
        mine, kafka = ours[key], theirs[key]
        assert (mine["committed"], mine["log_end"], mine["lag"]) == (
            kafka.current_offset,
            kafka.log_end_offset,
            kafka.lag,
        ), key
        p = key[1]
        # Both tools also agree with what the test actually did.
        assert (mine["committed"], mine["log_end"], mine["lag"]) == (
            COMMITTED[p],
            PRODUCED[p],
            PRODUCED[p] - COMMITTED[p],
        ), key
        if mine["lag"]:
            # Seconds behind: the age of the oldest unread record, written during this test.
            assert mine["lag_seconds"] is not None
            assert 0.0 <= mine["lag_seconds"] <= time.time() - t0 + 1.0, mine
        else:
            assert mine["lag_seconds"] == 0.0


def test_recloop_lag_table_shows_the_group_total(kafka_settings: Settings, kafka_broker):
    topic = kafka_settings.topics.transitions
    group = f"lagtable-{kafka_settings.topic_prefix.rstrip('.')[-8:]}"
    _leave_known_lag(kafka_settings, topic, group)

    proc = _recloop("lag", "--group", group, bootstrap=kafka_broker.bootstrap)
    assert proc.returncode == 0, proc.stderr
    rows = [
        [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        for line in proc.stdout.splitlines()
        if "│" in line
    ]
    # columns: group, topic, partition, committed, log end, lag, lag s
    totals = [row for row in rows if len(row) == 7 and row[1] == "total"]
    assert len(totals) == 1, proc.stdout
    assert totals[0][0] == group
    assert totals[0][5] == str(sum(PRODUCED) - sum(COMMITTED)), proc.stdout
    partitions = sorted(int(row[2]) for row in rows if len(row) == 7 and row[1] == topic)
    assert partitions == list(range(len(PRODUCED))), proc.stdout


def test_recloop_lag_on_an_unreachable_broker_names_the_address_and_the_fix():
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = _recloop("lag", "--group", "nobody", bootstrap=bootstrap, timeout=60)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert bootstrap in message, message
    assert "recloop kafka up" in message, message
    assert "RECLOOP_KAFKA_BOOTSTRAP" in message, message
    assert "Traceback" not in message, message
    assert time.monotonic() - t0 < 30  # it fails fast instead of waiting on the broker
