"""The pure parts of the local-broker and topic plumbing: configs, ids, parsing, topic plan."""

from __future__ import annotations

import base64
import socket
import xml.etree.ElementTree as ET

import pytest

from recloop.core import events, topics
from recloop.core.settings import Settings
from recloop.kafka.admin import planned_topics
from recloop.ops.broker import (
    KAFKA_VERSION,
    BrokerError,
    LocalBroker,
    render_properties,
    server_properties,
)
from recloop.ops.broker.config import new_cluster_id
from recloop.ops.broker.jars import pom
from tests.consumer_groups import parse_group_describe
from tests.fixtures import example_events, key_of, topic_for


def test_server_properties_describe_one_loopback_kraft_node(tmp_path):
    props = server_properties(19092, 19093, tmp_path / "data")
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["log.dirs"] == str(tmp_path / "data")
    # Every internal topic must fit on one broker, or groups never find a coordinator.
    for key, value in props.items():
        if key.endswith("replication.factor") or key.endswith("min.isr"):
            assert value == "1", key
    text = render_properties(props)
    assert text.count("\n") == len(props)
    assert "log.cleaner.enable=true\n" in text


def test_cluster_ids_are_22_char_base64url_not_starting_with_dash():
    ids = {new_cluster_id() for _ in range(300)}
    assert len(ids) == 300
    for cid in ids:
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_pom_names_the_broker_tools_and_logging_and_excludes_connect():
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.fromstring(pom(KAFKA_VERSION))
    assert root.findtext("m:packaging", namespaces=ns) == "pom"
    deps = {
        d.findtext("m:artifactId", namespaces=ns): d for d in root.iterfind(".//m:dependency", ns)
    }
    assert set(deps) == {
        "kafka_2.13",
        "kafka-tools",
        "log4j-slf4j-impl",
        "log4j-core",
        "log4j-api",
        "slf4j-api",
    }
    assert deps["kafka_2.13"].findtext("m:version", namespaces=ns) == KAFKA_VERSION
    excluded = [e.findtext("m:artifactId", namespaces=ns) for e in deps["kafka-tools"].iter()]
    assert "connect-runtime" in excluded


GROUP_OUTPUT = """
Consumer group 'g1' has no active members.

GROUP           TOPIC           PARTITION  CURRENT-OFFSET  LOG-END-OFFSET  LAG             CONSUMER-ID     HOST            CLIENT-ID
g1              t.a             0          4               10              6               -               -               -
g1              t.a             1          -               3               -               -               -               -
g1              t.b             2          7               7               0               rdkafka-1b2c    /127.0.0.1      rdkafka
"""


def test_consumer_group_table_is_parsed_with_dashes_as_none():
    rows = parse_group_describe(GROUP_OUTPUT)
    assert [(r.topic, r.partition, r.current_offset, r.log_end_offset, r.lag) for r in rows] == [
        ("t.a", 0, 4, 10, 6),
        ("t.a", 1, None, 3, None),
        ("t.b", 2, 7, 7, 0),
    ]
    assert rows[0].consumer_id is None
    assert (rows[2].consumer_id, rows[2].host, rows[2].client_id) == (
        "rdkafka-1b2c",
        "/127.0.0.1",
        "rdkafka",
    )
    assert parse_group_describe("Error: Consumer group 'x' does not exist.\n") == []


def test_topic_plan_covers_the_table_with_a_dlq_each():
    settings = Settings(topic_prefix="p.", partitions=6)
    plan = {t.name: t for t in planned_topics(settings)}
    assert len(plan) == 2 * len(topics.TOPIC_TABLE)
    for spec in topics.TOPIC_TABLE:
        main, dlq = plan[f"p.{spec.base_name}"], plan[f"p.{spec.base_name}.dlq"]
        assert main.compacted == spec.compacted and not main.is_dlq
        assert main.partitions == (6 if spec.per_user else 1)
        assert dlq.is_dlq and not dlq.compacted


def test_every_record_type_has_a_topic_and_a_key():
    for record in example_events():
        base = topic_for(type(record))
        assert type(record) in getattr(
            topics.spec(base).value, "__args__", (topics.spec(base).value,)
        )
        key = topics.spec(base).key  # a field of the record, or the literal key ("catalogue")
        assert key_of(record) == str(getattr(record, key, key))
    assert {type(r) for r in example_events()} == set(events.ALL_RECORD_TYPES)


def test_a_taken_port_is_a_clear_error_before_any_java_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalBroker(tmp_path, port=port)
        with pytest.raises(BrokerError, match=f"port {port} .* already in use"):
            broker.start()
    assert broker.pid is None
