"""No record stops the faust worker, and every dead letter gets written (issue 12, findings 1-2).

Through ``streams.batch.BatchFolder`` (the worker's fold of one fetch) and ``KafkaSink`` (its
dead letters), without a broker:

- a 2.1 kB record with a 996-deep array in an unknown field (the codec's recursion gave out
  and the ``RecursionError`` escaped the fold), a record over ``MAX_RECORD_BYTES``, a record
  on which the fold itself raises, and a stored state that does not decode each become a
  reject with a reason, and every valid record around them is folded as without them;
- a dead letter the producer refuses for its size (faust's 1,000,000-byte default, below the
  broker's limit) or the broker refuses at delivery goes truncated, with the original size in
  a header; any other delivery failure still raises from ``flush``;
- the worker's producer and consumer limits lie at or above the broker's ``message.max.bytes``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError

from recloop.core import codec
from recloop.core.dlq import (
    HEADER_ERROR,
    HEADER_ORIGINAL_SIZE,
    MAX_RECORD_BYTES,
    TRUNCATED_BYTES,
    parse_headers,
)
from recloop.core.events import Record, SlateServed
from recloop.core.settings import Settings
from recloop.streams import fold
from recloop.streams.app import KafkaSink
from recloop.streams.batch import BatchFolder, RawRecord
from recloop.streams.faust_internals import table_store
from recloop.streams.synthetic import SyntheticConfig, causal_events
from tests.unit.test_streams_agent import make_app

SETTINGS = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="hostile.")
TOPICS = SETTINGS.topics
KAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1_048_588
"""Kafka's default ``message.max.bytes``: the largest record batch a default broker accepts."""


def folder() -> BatchFolder:
    return BatchFolder(TOPICS.slates, TOPICS.feedback, fold.DEFAULT)


def raw(events: list[Any]) -> list[RawRecord]:
    return [
        RawRecord(
            TOPICS.slates if isinstance(e, SlateServed) else TOPICS.feedback,
            0,
            offset,
            e.user_id.encode(),
            codec.encode(e),
        )
        for offset, e in enumerate(events)
    ]


def expected(events: list[Any]) -> dict[str, fold.Transition]:
    states: dict = {}
    out: dict[str, fold.Transition] = {}
    for event in events:
        states[event.user_id], more = fold.apply(states.get(event.user_id), event)
        out.update((t.transition_id, t) for t in more)
    return out


def with_unknown_field(value: bytes, field: bytes) -> bytes:
    """``value`` (a JSON object) with one more member, ``"zz": field``, which decoding skips."""
    assert value.endswith(b"}")
    return value[:-1] + b',"zz":' + field + b"}"


DEEP = b"[" * 996 + b"]" * 996


def poison_slate(user: str, field: bytes) -> RawRecord:
    """A valid slate of its own user, but for one unknown field."""
    [slate] = [e for e in causal_events(SyntheticConfig(users=1, sessions=1, steps=1))[:1]]
    value = codec.encode(slate).replace(b'"u0', f'"{user}'.encode())
    return RawRecord(TOPICS.slates, 1, 10_000, user.encode(), with_unknown_field(value, field))


def around(poison: RawRecord) -> tuple[list[Record], list[RawRecord]]:
    """Valid events, and their records with ``poison`` in the middle."""
    events = causal_events(SyntheticConfig(users=4, sessions=1, steps=2, seed=8))
    records = raw(events)
    middle = len(records) // 2
    return events, [*records[:middle], poison, *records[middle:]]


def assert_only_poison_rejected(result: Any, poison: RawRecord, events: list[Record]) -> str:
    [(record, reason)] = result.rejects
    assert record == poison and reason
    assert {t.transition_id: t for _, _, t in result.transitions} == expected(events)
    assert poison.key not in result.states
    return reason


def test_a_deeply_nested_record_is_rejected_not_raised():
    poison = poison_slate("deep", DEEP)
    assert 2000 < len(poison.value) < 2600  # the 2.1 kB record
    events, records = around(poison)
    result = folder().fold(records, {}.get)
    assert_only_poison_rejected(result, poison, events)


def test_a_record_over_max_record_bytes_is_rejected_undecoded():
    # A valid slate, but for its size: refused for that alone.
    poison = poison_slate("big", b'"' + b"x" * (MAX_RECORD_BYTES + 50_000) + b'"')
    events, records = around(poison)
    result = folder().fold(records, {}.get)
    reason = assert_only_poison_rejected(result, poison, events)
    assert f"{MAX_RECORD_BYTES:,}-byte limit" in reason and "not decoded" in reason


def test_an_exception_in_the_fold_rejects_that_record_alone(monkeypatch):
    events = causal_events(SyntheticConfig(users=4, sessions=1, steps=2, seed=8))
    victim = next(e for e in events if isinstance(e, SlateServed) and e.user_id == "u2")
    real_apply = fold.apply

    def apply(state, event, config=fold.DEFAULT):
        if event == victim:
            raise KeyError("a bug in the fold")
        return real_apply(state, event, config)

    monkeypatch.setattr(fold, "apply", apply)
    records = raw(events)
    result = folder().fold(records, {}.get)
    [(record, reason)] = result.rejects
    assert codec.decode(record.value, SlateServed) == victim
    assert "KeyError" in reason and "a bug in the fold" in reason
    others = [e for e in events if e.user_id != "u2"]
    got = {t.transition_id: t for _, _, t in result.transitions if t.user_id != "u2"}
    assert got == expected(others)


@pytest.mark.parametrize(
    "stored",
    [b"{not json", DEEP, b'{"type":"SessionState","v":1}', b"[" + b"1," * 500_000 + b"1]"],
    ids=["malformed", "deep", "wrong-shape", "over-max-record-bytes"],
)
def test_a_stored_state_that_does_not_decode_counts_as_absent_and_is_dead_lettered(stored):
    events = causal_events(SyntheticConfig(users=3, sessions=1, steps=2, seed=2))
    records = raw(events)
    states = BatchFolder(TOPICS.slates, TOPICS.feedback, fold.DEFAULT, TOPICS.session_state)
    result = states.fold(records, {b"u1": stored}.get)
    [(record, reason)] = result.rejects
    assert (record.topic, record.key, record.offset, record.value) == (
        TOPICS.session_state, b"u1", -1, stored,
    )  # fmt: skip
    assert "stored session state does not decode" in reason
    assert result.unreadable == {b"u1"}
    # u1's session starts afresh from its records: nothing of theirs is lost or rejected.
    assert {t.transition_id: t for _, _, t in result.transitions} == expected(events)
    assert b"u1" in result.states


def test_the_app_drops_an_unreadable_stored_state_and_recovery_does_not_stop(
    tmp_path: Path, monkeypatch
):
    streams, sink = make_app(tmp_path)
    topics = streams.settings.topics
    store = table_store(streams.table)
    store[b"u0"] = store[b"u1"] = b"{not json"
    # Recovery replays the hostile value: noted, not raised, no open session.
    message = SimpleNamespace(key=b"u0", value=b"{not json", topic="t", partition=0, offset=3)
    asyncio.run(streams._on_changelog_event(SimpleNamespace(message=message)))
    assert b"u0" not in streams.open_sessions
    # u0's slate folds from scratch; u1's is refused by the fold, so u1 has no state: the
    # hostile value is dropped, and dead-lettered only once.
    real_apply = fold.apply

    def apply(state, event, config=fold.DEFAULT):
        if event.user_id == "u1":
            raise fold.InvalidEvent("refused")
        return real_apply(state, event, config)

    monkeypatch.setattr(fold, "apply", apply)
    for _ in range(2):
        slates = [poison_slate(user, b"1")._replace(topic=topics.slates) for user in ("u0", "u1")]
        asyncio.run(streams.process_batch(slates))
    assert isinstance(store[b"u0"], fold.FoldState) and b"u1" not in store
    letters = [(r.key, r.offset) for r, _ in sink.dead if r.topic == topics.session_state]
    assert sorted(letters) == [(b"u0", -1), (b"u1", -1)]


# --- Dead letters through the KafkaSink ------------------------------------------------------


class FakeProducer:
    """faust's producer as the sink uses it: ``send`` raises ``ProducerSendError`` from
    aiokafka's ``MessageSizeTooLargeError`` over ``max_request_size`` (as faust does), and a
    delivery fails with the broker's error for a record over ``broker_limit``, or with
    ``fail_with`` if given."""

    def __init__(
        self,
        max_request_size: int = 1_000_000,
        broker_limit: int = KAFKA_DEFAULT_MESSAGE_MAX_BYTES,
        fail_with: Exception | None = None,
    ) -> None:
        self.max_request_size = max_request_size
        self.broker_limit = broker_limit
        self.fail_with = fail_with
        self.delivered: list[tuple[str, bytes | None, bytes | None, dict[str, str]]] = []

    async def send(self, topic, key, value, partition, timestamp, headers) -> asyncio.Future:
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        size += 80  # the record batch's header and the record's framing
        if size > self.max_request_size:
            try:
                raise MessageSizeTooLargeError(f"The message is {size} bytes")
            except MessageSizeTooLargeError as exc:
                raise ProducerSendError(f"Error while sending: {exc!r}") from exc
        delivery = asyncio.get_running_loop().create_future()
        if self.fail_with is not None:
            delivery.set_exception(self.fail_with)
        elif size > self.broker_limit:
            delivery.set_exception(MessageSizeTooLargeError())
        else:
            self.delivered.append((topic, key, value, parse_headers(headers)))
            delivery.set_result(None)
        return delivery

    def _ensure_producer(self) -> FakeProducer:
        return self


def sink_with(producer: FakeProducer) -> KafkaSink:
    conf = SimpleNamespace(producer_max_request_size=producer.max_request_size)
    return KafkaSink(SimpleNamespace(producer=producer, conf=conf), SETTINGS)  # type: ignore[arg-type]


def dead_letter(sink: KafkaSink, record: RawRecord) -> None:
    async def run() -> None:
        await sink.dead_letter(record, "cannot decode")
        await sink.flush()

    asyncio.run(run())


def record_of(size: int) -> RawRecord:
    return RawRecord(TOPICS.feedback, 2, 41, b"u7", b"x" * size)


def assert_truncated(producer: FakeProducer, size: int) -> None:
    [(topic, key, value, headers)] = producer.delivered
    assert (topic, key, value) == (TOPICS.dlq(TOPICS.feedback), b"u7", b"x" * TRUNCATED_BYTES)
    assert headers[HEADER_ORIGINAL_SIZE] == str(size) and headers[HEADER_ERROR] == "cannot decode"


def test_a_dead_letter_over_the_producers_limit_goes_truncated():
    # The largest record a default broker takes, over faust's 1,000,000-byte producer default.
    size = KAFKA_DEFAULT_MESSAGE_MAX_BYTES - 200
    producer = FakeProducer()
    dead_letter(sink_with(producer), record_of(size))
    assert_truncated(producer, size)


def test_a_dead_letter_the_producer_refuses_for_its_size_is_sent_again_truncated():
    producer = FakeProducer(max_request_size=300_000)
    dead_letter(sink_with(producer), record_of(400_000))
    assert_truncated(producer, 400_000)


def test_a_dead_letter_the_broker_refuses_for_its_size_is_sent_again_truncated():
    producer = FakeProducer(broker_limit=300_000)  # a topic with a lower max.message.bytes
    dead_letter(sink_with(producer), record_of(400_000))
    assert_truncated(producer, 400_000)


def test_a_small_dead_letter_goes_whole():
    producer = FakeProducer()
    dead_letter(sink_with(producer), record_of(1000))
    [(_, key, value, headers)] = producer.delivered
    assert (key, value) == (b"u7", b"x" * 1000) and HEADER_ORIGINAL_SIZE not in headers


def test_any_other_dead_letter_failure_still_stops_the_worker():
    producer = FakeProducer(fail_with=KafkaTimeoutError())
    with pytest.raises(KafkaTimeoutError):
        dead_letter(sink_with(producer), record_of(1000))


def test_the_workers_limits_reach_the_brokers(tmp_path: Path):
    import inspect

    import aiokafka

    streams, _ = make_app(tmp_path)
    conf = streams.app.conf
    assert conf.producer_max_request_size >= KAFKA_DEFAULT_MESSAGE_MAX_BYTES
    assert conf.consumer_max_fetch_size >= KAFKA_DEFAULT_MESSAGE_MAX_BYTES
    fetch_max = inspect.signature(aiokafka.AIOKafkaConsumer).parameters["fetch_max_bytes"]
    assert fetch_max.default >= KAFKA_DEFAULT_MESSAGE_MAX_BYTES  # faust leaves it at this
