"""The local broker is a real Kafka: it starts, serves, reports lag and stops leaving no JVM."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import TopicPartition

from core.settings import Settings
from recloop.kafka.admin import create_topics, planned_topics
from recloop.kafka.broker import (
    KAFKA_VERSION,
    LocalBroker,
    describe_group,
    pid_running,
    port_open,
)
from recloop.kafka.clients import make_admin, make_consumer, make_producer

pytestmark = pytest.mark.integration


def test_broker_starts_serves_and_stops_leaving_no_jvm(tmp_path):
    # A second broker of its own, so the session broker's lifetime is not under test here.
    broker = LocalBroker(tmp_path / "kafka", die_with_parent=True)
    with broker:
        pid = broker.pid
        assert pid is not None and pid_running(pid)
        assert port_open(broker.port)
        assert broker.ready_seconds is not None and broker.ready_seconds < 120
        metadata = make_admin(Settings(kafka_bootstrap=broker.bootstrap)).list_topics(timeout=10)
        assert [b.id for b in metadata.brokers.values()] == [1]
        assert (broker.libs_dir / f"org.apache.kafka.kafka_2.13-{KAFKA_VERSION}.jar").exists()
    assert not pid_running(pid)
    assert not port_open(broker.port)
    assert not broker.is_alive()
    broker.stop()  # a second stop is harmless


def test_topics_are_created_with_layout_and_idempotently(kafka_settings: Settings):
    admin = make_admin(kafka_settings)
    metadata = admin.list_topics(timeout=10)
    plan = planned_topics(kafka_settings)
    for topic in plan:
        assert topic.name in metadata.topics, topic.name
        assert len(metadata.topics[topic.name].partitions) == topic.partitions
    compacted = {t.name for t in plan if t.compacted}
    assert compacted == {kafka_settings.topics.session_state, kafka_settings.topics.snapshots}

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
    consumer.commit(offsets=[TopicPartition(topic, 0, consumed[3].offset() + 1)], asynchronous=False)
    consumer.close()

    rows = describe_group(kafka_broker.bootstrap, group)
    assert [(r.topic, r.partition, r.current_offset, r.log_end_offset, r.lag) for r in rows] == [
        (topic, 0, 4, 10, 6)
    ]
