"""The expiry sweep under faust's test context (no broker): what it emits, counts and refuses.

- An expired session's unanswered slates are counted, and its buffered feedback that can now
  never be used is dead-lettered, before the state that no longer holds it is sent.
- Idleness counts from the later of a session's last event and the moment the worker began
  watching its partition: catching up on a backlog older than the timeout (synthetic
  timestamps are years old) ends nothing until the worker has watched that long.
- While the broker is away the sweep ends nothing and the worker says "waiting for the
  broker" (log and ``recloop_waiting_for_broker``); once it is back, watching starts over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from recloop.core import codec
from recloop.core.events import Impression, Record, SessionEnd, Transition
from recloop.core.settings import Settings
from recloop.streams.app import StreamsApp, StreamsConfig, create_app
from recloop.streams.batch import RawRecord, as_state
from recloop.streams.faust_internals import table_store
from recloop.streams.sender import BatchSender, send_transitions_then_states
from recloop.streams.synthetic import SyntheticConfig, causal_events

TIMEOUT_S = 60.0


class OrderedSink:
    """Records what the app sends, in the order it sends it; gathered results count as sent
    only when flushed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self._gathered: list[tuple[str, object]] = []

    async def state(self, key: bytes, partition: int, value: bytes) -> None:
        self._gathered.append(("state", (key, partition, as_state(value))))

    async def transition(self, key: bytes, partition: int, value: bytes) -> None:
        self._gathered.append(("transition", (key, partition, codec.decode(value, Transition))))

    async def flush(self) -> None:
        gathered, self._gathered = self._gathered, []
        self.calls += [*(c for c in gathered if c[0] == "transition"), ("flush", None)]
        self.calls += [c for c in gathered if c[0] == "state"]

    async def dead_letter(self, record: RawRecord, error: str) -> None:
        self.calls.append(("dead", (record, error)))

    def sent(self, kind: str) -> list:
        return [what for k, what in self.calls if k == kind]


def make_app(tmp_path: Path, bootstrap: str = "127.0.0.1:1") -> tuple[StreamsApp, OrderedSink]:
    sink = OrderedSink()
    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix="expiry-test.")
    config = StreamsConfig(
        app_id="expiry-test", data_dir=tmp_path, batch_within_s=0.01, session_timeout_s=TIMEOUT_S
    )
    return create_app(settings, config, sink), sink


async def feed(streams: StreamsApp, events: list[Record]) -> None:
    """Put the events through the agent (each user on partition int(user[1:]) % 2)."""
    async with streams.agent.test_context() as agent:
        for e in events:
            user: str = e.user_id  # type: ignore[attr-defined]
            await agent.put(codec.encode(e), key=user.encode(), partition=int(user[1:]) % 2)
        deadline = time.monotonic() + 20
        while streams.counts["records"] < len(events):
            assert time.monotonic() < deadline, f"agent stuck at {streams.counts}"
            await asyncio.sleep(0.01)


def open_sessions(users: int) -> list[Record]:
    """Sessions that never end by themselves: no SessionEnd."""
    events = causal_events(SyntheticConfig(users=users, sessions=1, steps=1, seed=5, click_prob=0))
    return [e for e in events if not isinstance(e, SessionEnd)]


def test_an_expired_session_counts_its_unanswered_slates_and_dead_letters_its_orphans(tmp_path):
    events = causal_events(SyntheticConfig(users=1, sessions=1, steps=3, seed=1, click_prob=0))
    # Slate r1 never comes (its impressions wait for it), r2 is never answered, and the
    # session never ends by itself.
    orphans = [e for e in events if isinstance(e, Impression) and e.request_id == "u0-s0-r1"]
    kept = [
        e for e in events
        if not isinstance(e, SessionEnd)
        and getattr(e, "request_id", None) != "u0-s0-r1"
        and not (isinstance(e, Impression) and e.request_id == "u0-s0-r2")
    ]  # fmt: skip
    streams, sink = make_app(tmp_path)
    asyncio.run(feed(streams, kept + orphans))
    assert sink.sent("transition") == [] and sink.sent("dead") == []
    assert len(orphans) == 3 and set(streams.open_sessions) == {b"u0"}
    last_ts = max(e.ts for e in events)
    sink.calls.clear()

    assert asyncio.run(streams.expire_idle(last_ts + TIMEOUT_S + 1, {0})) == 1
    # r0's transition goes out (its successor is r2, the next slate that came); r2 has none.
    assert [t.request_id for _, _, t in sink.sent("transition")] == ["u0-s0-r0"]
    assert streams.counts["unanswered"] == 1
    assert streams.counts["rejects"] == 3
    dead = sink.sent("dead")
    assert [codec.decode(r.value, Impression) for r, _ in dead] == orphans
    topic = streams.settings.topics.feedback
    assert {(r.topic, r.partition, r.offset, r.key) for r, _ in dead} == {(topic, 0, -1, b"u0")}
    assert all("ended before slate u0-s0-r1 arrived" in error for _, error in dead)
    # The dead letters go before the flush that sends the state no longer holding them.
    kinds = [kind for kind, _ in sink.calls]
    assert kinds == ["dead"] * 3 + ["transition", "flush", "state"]
    ((_, _, state),) = sink.sent("state")
    assert state.ended and state.early_feedback == []
    assert table_store(streams.table)[b"u0"] == state
    assert streams.open_sessions == {}

    sink.calls.clear()  # nothing is left to expire, count or dead-letter
    assert asyncio.run(streams.expire_idle(last_ts + 10 * TIMEOUT_S, {0})) == 0
    assert sink.sent("dead") == [] and streams.counts["rejects"] == 3


def test_a_backlog_older_than_the_timeout_waits_until_the_worker_watched_that_long(tmp_path):
    streams, sink = make_app(tmp_path)
    asyncio.run(feed(streams, open_sessions(users=2)))  # u0 on partition 0, u1 on 1
    now = time.time()  # every event is years older than this
    streams.watch({0}, now)
    streams.watch({0, 1}, now + 30)  # partition 1 came later; partition 0 keeps its time

    def sweep(at: float) -> int:
        return asyncio.run(streams.expire_idle(at, {0, 1}))

    assert sweep(now + TIMEOUT_S - 1) == 0  # idle for years by their timestamps, yet kept
    assert sweep(now + TIMEOUT_S + 1) == 1
    assert set(streams.open_sessions) == {b"u1"}
    assert sweep(now + 30 + TIMEOUT_S + 1) == 1
    assert len(sink.sent("transition")) == 2

    streams.watch({1}, now + 100)  # partition 0 given away, then back: watched anew
    streams.watch({0, 1}, now + 200)
    assert streams.watching_since == {0: now + 200, 1: now + 30}


def _free_port() -> int:
    async def bind() -> int:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port: int = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return port

    return asyncio.run(bind())


def _waiting() -> float | None:
    return REGISTRY.get_sample_value("recloop_waiting_for_broker", {"process": "streams"})


def test_while_the_broker_is_away_the_sweep_stands_still_and_watching_starts_over(
    tmp_path, caplog: pytest.LogCaptureFixture
):
    port = _free_port()  # nothing listens there: the broker is away
    streams, sink = make_app(tmp_path, bootstrap=f"127.0.0.1:{port}")
    asyncio.run(feed(streams, open_sessions(users=2)))
    sink.calls.clear()
    streams.owned_partitions = lambda: {0, 1}  # type: ignore[method-assign]
    streams.watch({0, 1}, time.time() - 2 * TIMEOUT_S)  # watched long enough: both are due
    caplog.set_level(logging.WARNING, logger="recloop.streams.app")

    async def outage_then_back() -> tuple[int, int]:
        await streams.broker.probe()
        assert streams.broker.away and _waiting() == 1
        during = await streams.sweep()
        assert sink.calls == []  # due, but nothing is judged, nor sent, while it is away
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        async with server:
            await streams.broker.probe()
        return during, await streams.sweep()

    during, after = asyncio.run(outage_then_back())
    assert during == 0
    assert not streams.broker.away and _waiting() == 0
    assert after == 0 and sink.sent("state") == []  # back: watching started over, not due yet
    assert all(time.time() - since < 10 for since in streams.watching_since.values())
    assert asyncio.run(streams.expire_idle(time.time() + TIMEOUT_S + 1, {0, 1})) == 2
    logged = caplog.text
    assert f"streams: waiting for the broker (127.0.0.1:{port}: " in logged
    assert "streams: the broker is back after" in logged


class _Batch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None]] = []

    def append(self, key: bytes | None, value: bytes | None, timestamp: None) -> object:
        self.records.append((key, value))
        return object()  # aiokafka returns the record's metadata; None means full

    def record_count(self) -> int:
        return len(self.records)


class _Producer:
    """The two AIOKafkaProducer calls ``BatchSender`` makes; every batch is acked at once."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> asyncio.Future:
        self.sent.append(topic)
        acked = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked


def test_states_wait_for_the_dead_letters_sent_before_them():
    async def scenario(dead_letter_fails: bool) -> list[str]:
        producer, states = _Producer(), BatchSender()
        states.add("session.state", 0, b"u0", b"ended")
        dead_letter = asyncio.get_running_loop().create_future()
        flush = asyncio.ensure_future(
            send_transitions_then_states(producer, BatchSender(), states, [dead_letter])
        )
        await asyncio.sleep(0.01)
        assert producer.sent == []  # the dead letter is not on the broker yet
        if dead_letter_fails:
            dead_letter.set_exception(RuntimeError("delivery failed"))
            with pytest.raises(RuntimeError):
                await flush
        else:
            dead_letter.set_result(None)
            await flush
        return producer.sent

    assert asyncio.run(scenario(dead_letter_fails=False)) == ["session.state"]
    assert asyncio.run(scenario(dead_letter_fails=True)) == []  # the state is never sent


def test_the_sweep_stands_still_while_the_group_rebalances(tmp_path):
    streams, sink = make_app(tmp_path)
    asyncio.run(feed(streams, open_sessions(users=2)))
    sink.calls.clear()
    streams.owned_partitions = lambda: {0, 1}  # type: ignore[method-assign]
    streams.watch({0, 1}, time.time() - 2 * TIMEOUT_S)  # both are due
    streams.app.rebalancing = True
    assert asyncio.run(streams.sweep()) == 0 and sink.calls == []
    streams.app.rebalancing = False
    assert asyncio.run(streams.sweep()) == 2
