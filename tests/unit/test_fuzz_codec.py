"""The fuzz tier: hostile bytes against the codec and every consumer's decode path.

The property, for every record type of ``events.ALL_RECORD_TYPES`` (the catalogue's
``ItemChunk`` and ``CatalogueAnnounced`` among them) and every topic's value type:
``codec.decode`` returns a record of the
type or raises ``RecordDecodeError``, nothing else (no ``RecursionError``, ``MemoryError``,
``OverflowError``), within a time bound per kB; a value over ``MAX_RECORD_BYTES`` is refused.
Inputs are large, deep and adversarial: random bytes, valid records with fields dropped or
retyped, NaN/inf/huge numbers, deep nesting in known and unknown fields (up to 5000 levels),
long lists and strings, wrong versions, truncations at every length, and values up to the
broker's 1,000,000 bytes, built cheaply by repetition.

The consumers: the ``Reader`` (``recloop.kafka.deadletter``, over ``MemoryBus``) returns or
dead-letters every record, never raises, and commits past everything it handled; the
streams ``BatchFolder`` folds or rejects every record, never raises.

Deterministic: every test is ``derandomize=True``, so CI sees the same examples each run.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recloop.core import codec, events, topics
from recloop.core.codec import RecordDecodeError
from recloop.core.dlq import (
    HEADER_ERROR,
    HEADER_OFFSET,
    HEADER_ORIGINAL_SIZE,
    HEADER_PARTITION,
    MAX_RECORD_BYTES,
    TRUNCATED_BYTES,
    parse_headers,
)
from recloop.core.membus import MemoryBus
from recloop.kafka.deadletter import Reader
from recloop.streams.batch import BatchFolder, RawRecord
from recloop.streams.fold import FoldConfig
from tests.fixtures import example_events

pytestmark = pytest.mark.fuzz

BROKER_LIMIT = 1_000_000
"""The broker's (and librdkafka's) default ``message.max.bytes``: the largest value a topic
can hand a consumer."""
FIXED_BUDGET_S = 0.25
PER_KB_BUDGET_S = 0.0005
"""A decode may take 250 ms plus 0.5 ms per kB (2 MB/s, hundreds of times slower than
msgspec) on a loaded 2-core machine: loose for noise, tight for a quadratic path."""

FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


def _targets() -> dict[str, Any]:
    """Every type something decodes: each record type, each topic's value."""
    out: dict[str, Any] = {t.__name__: t for t in events.ALL_RECORD_TYPES}
    for spec in topics.TOPIC_TABLE:
        out.setdefault(f"topic:{spec.base_name}", spec.value)
    return out


TARGETS = _targets()


def _members(target: Any) -> tuple[type, ...]:
    return tuple(getattr(target, "__args__", (target,)))


def _examples_for(target: Any) -> list[events.Record]:
    """The fixture records a decoder of ``target`` accepts."""
    names = {m.__struct_config__.tag for m in _members(target)}
    found = [r for r in example_events() if type(r).__struct_config__.tag in names]
    assert found, f"no example for {target}"
    return found


def _as_obj(record: events.Record) -> dict[str, Any]:
    obj = msgspec.json.decode(codec.encode(record))
    assert isinstance(obj, dict)
    return obj


for _target in TARGETS.values():  # every decoder built before any timing
    codec.decoder_for(_target)


def check_decode(data: bytes, target: Any) -> events.Record | None:
    """The property: a record of ``target``, or ``RecordDecodeError``; in time; over-size
    values refused. Any other exception escapes and fails the test that called it."""
    t0 = time.perf_counter()
    try:
        record = codec.decode(data, target)
    except RecordDecodeError:
        record = None
    elapsed = time.perf_counter() - t0
    budget = FIXED_BUDGET_S + PER_KB_BUDGET_S * len(data) / 1000
    assert elapsed <= budget, f"decoding {len(data):,} B took {elapsed:.3f} s > {budget:.3f} s"
    if record is not None:
        assert isinstance(record, _members(target)), type(record)
        assert len(data) <= MAX_RECORD_BYTES, f"a {len(data):,} B value was decoded"
    return record


# -- hostile pieces of JSON -------------------------------------------------------------------

HOLE = "@@fuzz-hole@@"
_HOLE_BYTES = msgspec.json.encode(HOLE)


def _deep(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'[{"a":' * (depth // 2) + b"0" + b"}]" * (depth // 2)


SCALARS = [
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e-999", b"-0",
    str(10**30).encode(), str(2**63).encode(), str(-(2**63) - 1).encode(), str(2**64).encode(),
    str(2**63 - 1).encode(), str(10**15).encode(), b"1.5", b"-1", b"0", b"null", b"true",
    b'""', b'"x"', b"[]", b"{}", b'"\\ud800"', b'"\\u0000"', b"1" + b"0" * 5000,
]  # fmt: skip
scalars = st.sampled_from(SCALARS)
deep = st.builds(_deep, st.sampled_from([64, 996, 1000, 2000, 5000]),
                 st.sampled_from(["array", "object", "mixed"]))  # fmt: skip
long_strings = st.builds(
    lambda unit, n: b'"' + unit * n + b'"',
    st.sampled_from([b"a", b"\\u00e9", b"\\n", "\u00e9".encode()]),
    st.sampled_from([1000, 100_000, 450_000, 899_000]),
)
long_lists = st.builds(
    lambda item, n: b"[" + (item + b",") * n + item + b"]",
    st.sampled_from([b"7", b"1e308", b"-1", b"1000000000000000", b'"r"', b"[0.5,0.5]", b"[]"]),
    st.sampled_from([1000, 50_000, 120_000, 200_000]),
)
tokens = st.one_of(scalars, deep, long_strings, long_lists)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path into ``obj`` (dicts and lists, the tag too)."""
    out: list[tuple[Any, ...]] = []
    items: list[tuple[Any, Any]] = []
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _parent(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        obj = obj[key]
    return obj


@st.composite
def mutated(draw: st.DrawFn, target: Any) -> bytes:
    """A valid record of ``target`` changed by one to three hostile edits."""
    obj = _as_obj(draw(st.sampled_from(_examples_for(target))))
    holes: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        parent = _parent(obj, path)
        edit = draw(st.sampled_from(["drop", "retype", "unknown", "version", "unknown-nested"]))
        if edit == "drop" and isinstance(parent, dict):
            parent.pop(path[-1], None)
            continue
        if edit == "version":
            parent, path = obj, ("v",)
        elif edit == "unknown":
            parent, path = obj, (f"zz_unknown_{len(holes)}",)
        elif edit == "unknown-nested" and isinstance(parent, dict):
            path = (*path[:-1], f"zz_unknown_{len(holes)}")
        if isinstance(parent, (dict, list)) and (isinstance(parent, dict)
                                                 or path[-1] < len(parent)):  # fmt: skip
            parent[path[-1]] = HOLE
            holes.append(draw(tokens))
    data = msgspec.json.encode(obj)
    for token in holes:
        data = data.replace(_HOLE_BYTES, token, 1)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


repeated_bytes = st.builds(lambda chunk, n: chunk * n, st.binary(min_size=1, max_size=64),
                           st.sampled_from([1, 100, 15_000, 14_063, 16_000, 1_000_000 // 64]))  # fmt: skip
random_bytes = st.one_of(st.binary(max_size=4096), repeated_bytes)


def hostile(target: Any) -> st.SearchStrategy[bytes]:
    return st.one_of(random_bytes, mutated(target))


# -- the codec --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_random_bytes_decode_or_raise_record_decode_error(name: str) -> None:
    target = TARGETS[name]

    @FUZZ
    @given(random_bytes)
    def check(data: bytes) -> None:
        check_decode(data, target)

    check()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_records_decode_or_raise_record_decode_error(name: str) -> None:
    target = TARGETS[name]

    @FUZZ
    @given(mutated(target))
    def check(data: bytes) -> None:
        check_decode(data, target)

    check()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_truncation_of_a_valid_record_is_a_record_decode_error(name: str) -> None:
    target = TARGETS[name]
    for record in _examples_for(target):
        data = codec.encode(record)
        assert check_decode(data, target) is not None
        for cut in range(len(data)):
            with pytest.raises(RecordDecodeError):
                codec.decode(data[:cut], target)


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("depth", [996, 5000])
@pytest.mark.parametrize("where", ["unknown", "known"])
def test_deep_nesting_is_a_record_decode_error(name: str, depth: int, where: str) -> None:
    # The 2.1 kB record: a 996-deep array in an unknown field (RecursionError before).
    target = TARGETS[name]
    obj = _as_obj(_examples_for(target)[0])
    field = "zz_unknown" if where == "unknown" else next(
        (k for k, v in obj.items() if isinstance(v, list)), "user_id")  # fmt: skip
    obj[field] = HOLE
    data = msgspec.json.encode(obj).replace(_HOLE_BYTES, _deep(depth, "array"))
    record = check_decode(data, target)
    if where == "known":
        assert record is None


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("size", [899_990, MAX_RECORD_BYTES, MAX_RECORD_BYTES + 1, BROKER_LIMIT])
def test_values_up_to_the_broker_limit_are_decoded_in_time_or_refused(name: str, size: int) -> None:
    target = TARGETS[name]
    obj = _as_obj(_examples_for(target)[0])
    obj["zz_padding"] = ""
    head = msgspec.json.encode(obj)
    data = head.replace(b'"zz_padding":""', b'"zz_padding":"' + b"p" * (size - len(head)) + b'"')
    assert len(data) == size
    record = check_decode(data, target)
    if size > MAX_RECORD_BYTES:
        assert record is None
    # Long lists up to the limit in every list field, and a megabyte of garbage.
    for field, value in list(obj.items()):
        if isinstance(value, list):
            item = b"[0.5]" if value and isinstance(value[0], list) else b"7"
            n = (size - len(head)) // (len(item) + 1)
            listed = dict(obj, **{field: HOLE})
            body = msgspec.json.encode(listed)
            check_decode(body.replace(_HOLE_BYTES, b"[" + (item + b",") * n + item + b"]"),
                          target)  # fmt: skip
    assert check_decode(b"\xff" * size, target) is None
    assert check_decode(b"[" * size, target) is None


# -- the consumers' decode paths -----------------------------------------------------------

TOPICS = topics.Topics()
BASE_TOPICS = [spec.base_name for spec in topics.TOPIC_TABLE]


@st.composite
def topic_values(draw: st.DrawFn) -> list[tuple[str, bytes, bool]]:
    """(base topic, value, is a valid record) for a mix of valid and hostile records."""
    out = []
    for _ in range(draw(st.integers(1, 12))):
        spec = draw(st.sampled_from(topics.TOPIC_TABLE))
        if draw(st.booleans()):
            record = draw(st.sampled_from(_examples_for(spec.value)))
            out.append((spec.base_name, codec.encode(record), True))
        else:
            out.append((spec.base_name, draw(hostile(spec.value)), False))
    return out


@FUZZ
@given(topic_values())
def test_the_reader_returns_or_dead_letters_every_record_and_never_raises(
    batch: list[tuple[str, bytes, bool]],
) -> None:
    bus = MemoryBus(partitions=2)
    sent = []
    for base, value, valid in batch:
        topic = TOPICS.name(base)
        bus.publish(topic, b"u-1", value)
        message = bus.records(topic)[-1]
        sent.append((topic, message.partition, message.offset, value, valid))
    reader = Reader(bus, TOPICS, BASE_TOPICS, "fuzz", "fuzz:reader")
    returned = {}
    while not reader.consumer.caught_up():  # a poll may dead-letter all it read
        for item in reader.poll_batch(5, 0):
            assert isinstance(item.value, _members(topics.spec(_base(item.topic)).value))
            returned[(item.topic, item.partition, item.offset)] = item
    letters = {}
    for topic in {s[0] for s in sent}:
        for letter in bus.records(TOPICS.dlq(topic)):
            headers = parse_headers(list(letter.headers))
            letters[(topic, int(headers[HEADER_PARTITION]), int(headers[HEADER_OFFSET]))] = (
                letter, headers)  # fmt: skip
    for topic, partition, offset, value, valid in sent:
        where = (topic, partition, offset)
        assert (where in returned) != (where in letters), f"{where}: returned xor dead-lettered"
        if valid:
            assert where in returned, f"a valid record at {where} was not returned"
        if where in letters:
            letter, headers = letters[where]
            assert headers[HEADER_ERROR], "a dead letter carries its reason"
            if len(value) > MAX_RECORD_BYTES:
                assert headers.get(HEADER_ORIGINAL_SIZE) == str(len(value)), (
                    f"a {len(value):,} B record is dead-lettered truncated, its size in a header"
                )
                assert len(letter.value) <= TRUNCATED_BYTES
                assert value.startswith(letter.value)
            else:
                assert letter.value == value
    committed = reader.commit()
    ends = {(t, p): o + 1 for t, p, o, _, _ in sent}
    assert {k: v for k, v in committed.items() if k in ends} == ends, "commits past all"


def _base(topic: str) -> str:
    return next(base for base in BASE_TOPICS if TOPICS.name(base) == topic)


FEED = [
    r for r in example_events() if isinstance(r, (events.SlateServed, *_members(events.Feedback)))
]


@st.composite
def fold_inputs(draw: st.DrawFn) -> list[RawRecord]:
    """Raw records on the slates and feedback topics (and a stray one): valid, hostile,
    decodable but hostile (huge ids, long lists), with right and wrong keys."""
    out = []
    for offset in range(draw(st.integers(1, 10))):
        topic = draw(st.sampled_from([TOPICS.slates, TOPICS.feedback, "stray"]))
        target = events.SlateServed if topic == TOPICS.slates else events.Feedback
        kind = draw(st.sampled_from(["valid", "hostile", "hostile"]))
        if kind == "valid":
            record = draw(st.sampled_from(FEED))
            value: bytes | None = codec.encode(record)
        else:
            value = draw(st.one_of(hostile(target), st.none()))
        key = draw(st.sampled_from([b"u-1", b"u-2", None]))
        out.append(RawRecord(topic, 0, offset, key, value))
    return out


STATE = next(r for r in example_events() if isinstance(r, events.SessionState))


@FUZZ
@given(fold_inputs(), st.one_of(st.none(), st.just(codec.encode(STATE)),
                                hostile(events.SessionState)))  # fmt: skip
def test_the_batch_folder_folds_or_rejects_every_record_and_never_raises(
    records: list[RawRecord], stored: bytes | None
) -> None:
    # ``stored`` is what the table holds for u-1 (the compacted topic replays hostile states).
    folder = BatchFolder(TOPICS.slates, TOPICS.feedback, FoldConfig())
    result = folder.fold(records, lambda key: stored if key == b"u-1" else None)
    rejected = {raw.offset for raw, reason in result.rejects if raw.offset >= 0}
    for _raw, reason in result.rejects:
        assert reason, "a reject carries its reason"
    for record in records:
        decodable = True
        try:
            folder.decode(record)
        except Exception:  # the property is on fold: whatever decode raises, fold rejects
            decodable = False
        if not decodable:
            assert record.offset in rejected, f"undecodable record {record.offset} not rejected"
    for _key, (_partition, encoded, _state) in result.states.items():
        assert len(encoded) <= MAX_RECORD_BYTES, "a folded state fits under the record limit"
