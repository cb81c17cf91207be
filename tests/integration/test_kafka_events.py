"""Every event type goes through the real broker with confluent-kafka and comes back equal."""

from __future__ import annotations

import time

import pytest

from recloop.core import codec, events
from recloop.core.settings import Settings
from recloop.core.topics import spec
from recloop.kafka.clients import (
    DeliveryTracker,
    flush_or_raise,
    make_consumer,
    make_producer,
    produce_records,
)
from tests.fixtures import example_events, key_of, round_trip, topic_for

pytestmark = pytest.mark.integration


def test_examples_cover_every_record_type():
    assert {type(r) for r in example_events()} == set(events.ALL_RECORD_TYPES)


def test_every_event_type_round_trips_through_confluent_kafka(kafka_settings: Settings):
    sent = example_events()
    producer = make_producer(kafka_settings)
    tracker = DeliveryTracker()
    for record in sent:
        topic = kafka_settings.topics.name(topic_for(type(record)))
        produce_records(producer, topic, [record], key_of, on_delivery=tracker)
    flush_or_raise(producer, tracker)
    assert tracker.delivered == len(sent)

    # A plain consumer, decoding by hand: the wire format alone carries the records.
    wanted = {kafka_settings.topics.name(topic_for(type(r))): topic_for(type(r)) for r in sent}
    consumer = make_consumer(kafka_settings, f"{kafka_settings.topic_prefix}plain")
    consumer.subscribe(sorted(wanted))
    got = {}
    deadline = time.monotonic() + 30
    while len(got) < len(sent) and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        record = codec.decode(msg.value(), spec(wanted[msg.topic()]).value)
        assert msg.key() == key_of(record).encode()
        got[type(record)] = record
    consumer.close()
    assert got == {type(r): r for r in sent}


def test_every_event_type_round_trips_through_the_dlq_consumer(kafka_settings: Settings):
    sent = example_events(ts=1_800_000_000.5)
    got = round_trip(kafka_settings, sent)
    assert [c.value for c in got] == sent
    for c in got:
        assert c.topic == kafka_settings.topics.name(topic_for(type(c.value)))
        assert c.key == key_of(c.value).encode()


def test_a_new_group_reads_from_the_start_past_an_earlier_runs_records(kafka_settings: Settings):
    first = round_trip(kafka_settings, example_events(ts=1_700_000_000.0))
    second_sent = example_events(ts=1_700_000_100.0)
    second = round_trip(kafka_settings, second_sent)
    assert [c.value for c in second] == second_sent
    # Same topics, later offsets: the second run found its own records, not the first's.
    for a, b in zip(first, second, strict=True):
        assert (a.topic, a.partition) == (b.topic, b.partition) and b.offset > a.offset
