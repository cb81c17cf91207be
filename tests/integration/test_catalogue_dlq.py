"""Malformed catalogue records and schema-1 records on a real broker: dead-lettered with their
reasons, and nothing else lost (issue 13: "a record of the old schema and a malformed item
record end in the DLQ with their reasons; nothing else is lost").

On ``items``, between the chunks of a good catalogue (published by ``publish_catalogue``, as
the simulator does): a chunk whose byte length disagrees with its rows, a chunk of NaN
features, and bytes that are no record. Two catalogue followers (one reading while it is
published, one joining after) each dead-letter the three with the reason and install the
good catalogue, bit for bit. On ``rec.requests`` and ``rec.slates``, between valid v2
records: a RecRequest and a SlateServed as schema 1 wrote them (with candidate feature
rows). The ``Reader`` every service reads through dead-letters each with the "schema
version 1" reason and returns every v2 record, committed past all of them.
"""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest

from recloop.core import codec, events
from recloop.core.catalogue import ItemCatalogue, chunk_rows
from recloop.core.dlq import HEADER_CONSUMER, HEADER_ERROR, HEADER_OFFSET, HEADER_TOPIC
from recloop.core.settings import Settings
from recloop.kafka.bus import KafkaBus
from recloop.kafka.catalogue import CatalogueFollower, publish_catalogue
from recloop.kafka.deadletter import Reader
from recloop.ops.chaos_readback import read_records
from tests.fixtures import example_events

pytestmark = pytest.mark.integration

F = 8
N = 3 * chunk_rows(F) + 17  # four chunks, the last one short


def _catalogue() -> ItemCatalogue:
    rng = np.random.default_rng(13)
    return ItemCatalogue(rng.normal(size=(N, F)).astype(np.float32), version=1)


def _bad_items(ts: float) -> list[tuple[bytes, bytes, str]]:
    """``(key, value, reason fragment)`` of each malformed item record."""
    short = events.ItemChunk(first_item=0, n=4, dim=F, features=b"\x00" * (4 * F * 4 - 3), ts=ts)
    nan_rows = np.full((4, F), np.nan, dtype="<f4").tobytes()
    nan = events.ItemChunk(first_item=chunk_rows(F), n=4, dim=F, features=nan_rows, ts=ts)
    return [
        (b"0", codec.encode(short), f"{4 * F * 4 - 3:,} feature bytes, 4 rows x {F} float32"),
        (str(chunk_rows(F)).encode(), codec.encode(nan), "holds NaN or infinity"),
        (b"junk", b'{"type":"ItemChunk","v":2,"first_item":"zero"\xff', "cannot decode"),
    ]


def _v1(record: events.Record) -> bytes:
    """``record`` as schema 1 wrote it: ``v`` 1, with every candidate's feature row."""
    obj = msgspec.json.decode(codec.encode(record))
    obj.update(v=1, candidate_features=[[0.5] * F for _ in obj.get("candidates", [])])
    return msgspec.json.encode(obj)


def _letters(settings: Settings, topic: str) -> list:
    return read_records(settings, settings.topics.dlq(topic), timeout_s=30.0)


def test_malformed_item_records_are_dead_lettered_and_followers_install_the_good_catalogue(
    kafka_settings: Settings,
) -> None:
    names = kafka_settings.topics
    good = _catalogue()
    bus = KafkaBus(kafka_settings, process="test-catalogue")
    early = CatalogueFollower(bus, names, "early")
    late: CatalogueFollower | None = None
    try:
        early.poll(timeout=0.5)  # joined (reads from the beginning of both topics)
        bad = _bad_items(time.time())
        # Between the good chunks: the bad ones first (their keys shadow the good ones'), then
        # the whole good version and its announcement.
        for key, value, _ in bad:
            bus.publish(names.items, key, value)
        assert publish_catalogue(bus, names, good) == 4
        got = early.wait(timeout_s=60.0)
        late = CatalogueFollower(bus, names, "late")
        got_late = late.wait(timeout_s=60.0)
        for follower, installed in ((early, got), (late, got_late)):
            assert installed.version == 1 and installed.sha256 == good.sha256
            np.testing.assert_array_equal(installed.features_NF, good.features_NF)
            assert follower.refused == 2  # the two that decode; the third never became a chunk
        # Both followers dead-letter all three, each with its reason, and nothing else.
        deadline = time.monotonic() + 30
        letters: list = []
        while time.monotonic() < deadline and len(letters) < 6:
            letters = _letters(kafka_settings, names.items)
            time.sleep(0.5)
        assert len(letters) == 6, [(r.headers.get(HEADER_CONSUMER), r.value[:40]) for r in letters]
        for name in ("early", "late"):
            # (the undecodable one goes aside as it is read, the refused chunks as folded)
            mine = {
                r.value: r for r in letters if r.headers[HEADER_CONSUMER] == f"{name}-catalogue"
            }
            assert sorted(mine) == sorted(v for _, v, _ in bad)
            for _, value, reason in bad:
                assert reason in mine[value].headers[HEADER_ERROR], mine[value].headers
                assert mine[value].headers[HEADER_TOPIC] == names.items
    finally:
        early.close()
        if late is not None:
            late.close()
        bus.flush(10)


def test_schema_1_requests_and_slates_are_dead_lettered_saying_so_and_v2_flows(
    kafka_settings: Settings,
) -> None:
    names = kafka_settings.topics
    request = next(r for r in example_events() if isinstance(r, events.RecRequest))
    slate = next(r for r in example_events() if isinstance(r, events.SlateServed))
    bus = KafkaBus(kafka_settings, process="test-v1")
    sent: dict[str, list[bytes]] = {names.requests: [], names.slates: []}
    old: dict[str, list[bytes]] = {names.requests: [], names.slates: []}
    for i in range(6):
        for topic, record in ((names.requests, request), (names.slates, slate)):
            record = msgspec.structs.replace(record, request_id=f"r-{i}", user_id="u-1")
            value = codec.encode(record)
            sent[topic].append(value)
            bus.publish(topic, b"u-1", value)  # one key: one partition, this order
            if i % 2 == 0:
                v1 = _v1(record)
                assert b'"v":1' in v1 and b"candidate_features" in v1
                old[topic].append(v1)
                bus.publish(topic, b"u-1", v1)
    bus.flush(30)

    reader = Reader(bus, names, ["rec.requests", "rec.slates"], names.group("v1-test"), "v1-test")
    got: dict[str, list[bytes]] = {names.requests: [], names.slates: []}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(map(len, got.values())) < 12:
            for item in reader.poll_batch(100, timeout=0.5):
                got[item.topic].append(codec.encode(item.value))
        reader.commit()
        bus.flush(10)
    finally:
        reader.close()
    assert got == sent  # every v2 record, in order
    assert reader.stats.dead_lettered == 6
    for topic, record_type in ((names.requests, "RecRequest"), (names.slates, "SlateServed")):
        letters = _letters(kafka_settings, topic)
        assert [r.value for r in letters] == old[topic]
        for letter in letters:
            reason = letter.headers[HEADER_ERROR]
            assert reason.startswith(f"cannot decode {record_type}: schema version 1 (")
            assert "candidate feature rows" in reason and "no longer read" in reason
            assert letter.headers[HEADER_TOPIC] == topic and HEADER_OFFSET in letter.headers
