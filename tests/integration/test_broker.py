"""The local broker is a real Kafka: it starts, serves, reports lag and stops leaving no JVM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from confluent_kafka import TopicPartition
from typer.testing import CliRunner

from recloop.cli import kafka as cli_kafka
from recloop.core.settings import Settings
from recloop.kafka.admin import create_topics, planned_topics
from recloop.kafka.clients import make_admin, make_consumer, make_producer
from recloop.ops.broker import (
    KAFKA_VERSION,
    BrokerError,
    LocalBroker,
    free_port,
    pid_running,
    read_state,
)
from tests.consumer_groups import describe_group

pytestmark = pytest.mark.integration


def test_session_broker_is_a_single_kraft_node_from_the_versioned_jars(kafka_broker):
    assert kafka_broker.pid is not None and pid_running(kafka_broker.pid)
    # Measured from this JVM's spawn to its first accepted connection: positive, and no longer
    # than the JVM has lived (a clock started before the jar fetch or the format would be).
    assert kafka_broker.ready_seconds is not None
    assert 0 < kafka_broker.ready_seconds <= _process_age_s(kafka_broker.pid) + 0.05
    metadata = make_admin(Settings(kafka_bootstrap=kafka_broker.bootstrap)).list_topics(timeout=10)
    assert [b.id for b in metadata.brokers.values()] == [1]
    assert kafka_broker.libs_dir.parent.name == f"kafka-{KAFKA_VERSION}"
    assert (kafka_broker.libs_dir / f"org.apache.kafka.kafka_2.13-{KAFKA_VERSION}.jar").exists()
    # The log4j binding is on the classpath, so the broker writes its log.
    assert "Kafka Server started" in kafka_broker.log_file.read_text()


def _process_age_s(pid: int) -> float:
    """Seconds since ``pid`` started: /proc/uptime less field 22 of /proc/<pid>/stat."""
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    started_s = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # fields count from 3 here
    return float(Path("/proc/uptime").read_text().split()[0]) - started_s


def test_topics_are_created_with_layout_and_idempotently(kafka_settings: Settings):
    admin = make_admin(kafka_settings)
    metadata = admin.list_topics(timeout=10)
    plan = planned_topics(kafka_settings)
    for topic in plan:
        assert topic.name in metadata.topics, topic.name
        assert len(metadata.topics[topic.name].partitions) == topic.partitions
    compacted = {t.name for t in plan if t.compacted}
    t = kafka_settings.topics
    assert compacted == {t.session_state, t.snapshots, t.items, t.catalogue}

    from confluent_kafka.admin import ConfigResource, ResourceType

    resource = ConfigResource(ResourceType.TOPIC, kafka_settings.topics.session_state)
    config = admin.describe_configs([resource])[resource].result()
    assert config["cleanup.policy"].value == "compact"

    again = create_topics(kafka_settings)  # the fixture already created them all
    assert again.created == []
    assert sorted(again.existing) == sorted(t.name for t in plan)


def test_consumer_group_command_reports_the_lag_we_left(kafka_settings: Settings, kafka_broker):
    topic = kafka_settings.topics.outcomes
    producer = make_producer(kafka_settings)
    for i in range(10):
        producer.produce(topic, key=b"u", value=str(i).encode(), partition=0)
    assert producer.flush(10) == 0

    group = f"{kafka_settings.topic_prefix}lag"
    consumer = make_consumer(kafka_settings, group)
    consumer.assign([TopicPartition(topic, 0, 0)])
    consumed = []
    deadline = time.monotonic() + 20
    while len(consumed) < 4 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            consumed.append(msg)
    consumer.commit(
        offsets=[TopicPartition(topic, 0, consumed[3].offset() + 1)], asynchronous=False
    )
    consumer.close()

    rows = describe_group(kafka_broker.bootstrap, group)
    assert [(r.topic, r.partition, r.current_offset, r.log_end_offset, r.lag) for r in rows] == [
        (topic, 0, 4, 10, 6)
    ]


def test_a_broker_that_dies_at_start_is_a_clear_error_with_its_log(tmp_path):
    broker = LocalBroker(tmp_path / "kafka", die_with_parent=True, quick_start=True)
    # A data dir formatted for another node id: Kafka refuses to start on it.
    (broker.data_dir).mkdir(parents=True)
    (broker.data_dir / "meta.properties").write_text(
        "version=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAQ\nnode.id=7\n"
        "directory.id=AAAAAAAAAAAAAAAAAAAAAg\n"
    )
    with pytest.raises(BrokerError, match=r"exited \(code \d+\) before it was ready") as info:
        broker.start()
    assert "server.log" in str(info.value) or "console.log" in str(info.value)
    assert broker.pid is None


def test_cli_kafka_up_status_down_across_invocations(tmp_path, monkeypatch):
    # Each invoke is a separate command run; only the state file under RECLOOP_HOME links them.
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path))
    app, bench = typer.Typer(), typer.Typer()
    cli_kafka.register(app, bench)
    runner = CliRunner()
    port = free_port()

    def cli(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(app, list(args))

    assert cli("kafka", "status").exit_code == 1
    up = cli("kafka", "up", "--port", str(port))
    assert up.exit_code == 0, up.output
    state = read_state(tmp_path)
    try:
        assert state is not None and state.port == port and pid_running(state.pid)
        status = cli("kafka", "status")
        assert status.exit_code == 0 and "accepting connections" in status.output
        topics = cli("topics", "create", "--bootstrap", f"127.0.0.1:{port}", "--partitions", "2")
        assert topics.exit_code == 0, topics.output
        assert topics.output.count("created") == len(planned_topics(Settings()))
    finally:
        down = cli("kafka", "down")
    assert down.exit_code == 0 and str(state.pid) in down.output
    assert not pid_running(state.pid)
    assert read_state(tmp_path) is None
    assert cli("kafka", "status").exit_code == 1


NESTED_CONFTEST = "from tests.conftest import kafka_broker  # noqa: F401\n"
NESTED_TEST = """
import os, pathlib, time

def test_inner(kafka_broker):
    pathlib.Path(os.environ["PIDFILE"]).write_text(str(kafka_broker.pid))
    if os.environ["HOW"] == "fail":
        raise AssertionError("deliberate failure")
    time.sleep(300)  # wait here to be killed
"""


@pytest.mark.parametrize("how", ["fail", "sigkill"])
def test_session_fixture_leaves_no_jvm_when_a_test_fails_or_pytest_dies(tmp_path, how):
    (tmp_path / "conftest.py").write_text(NESTED_CONFTEST)
    (tmp_path / "test_inner.py").write_text(NESTED_TEST)
    pidfile = tmp_path / "pid"
    env = {**os.environ, "PIDFILE": str(pidfile), "HOW": how}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", str(tmp_path), "-q", "-p", "no:cacheprovider"]
    inner = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while not pidfile.exists() or not pidfile.read_text():
            assert inner.poll() is None, inner.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "inner session never started its broker"
            time.sleep(0.2)
        jvm = int(pidfile.read_text())
        assert pid_running(jvm)
        if how == "sigkill":
            inner.kill()  # no teardown, no atexit: only the parent-death signal is left
        inner.wait(60)
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()
    output = inner.stdout.read().decode()
    if how == "fail":
        assert inner.returncode == 1 and "deliberate failure" in output, output[-3000:]
    deadline = time.monotonic() + 30
    while pid_running(jvm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_running(jvm), f"JVM {jvm} outlived the test session ({how})"
