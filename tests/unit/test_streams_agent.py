"""The faust agent under faust's own test context (no broker): batches in, results out.

The sink is a recorder: what it receives is what the worker would send to Kafka. The Kafka
path itself is covered by tests/integration/test_streams_kafka.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from recloop.core import codec
from recloop.core.events import Click, SessionState, Transition
from recloop.core.settings import Settings
from recloop.streams import fold
from recloop.streams.app import StreamsApp, StreamsConfig, create_app
from recloop.streams.batch import RawRecord
from recloop.streams.faust_internals import (
    installed_batch_handlers,
    merge_by_handler,
    table_store,
)
from recloop.streams.synthetic import SyntheticConfig, causal_events


class RecordingSink:
    """Records what is flushed; what was gathered but never flushed would never be sent."""

    def __init__(self) -> None:
        self.states: list[tuple[bytes, int, bytes]] = []
        self.transitions: list[tuple[bytes, int, Transition]] = []
        self.dead: list[tuple[RawRecord, str]] = []
        self._gathered: list[tuple[str, bytes, int, bytes]] = []

    async def state(self, key: bytes, partition: int, value: bytes) -> None:
        self._gathered.append(("state", key, partition, value))

    async def transition(self, key: bytes, partition: int, value: bytes) -> None:
        self._gathered.append(("transition", key, partition, value))

    async def flush(self) -> None:
        gathered, self._gathered = self._gathered, []
        for kind, key, partition, value in gathered:
            if kind == "state":
                self.states.append((key, partition, value))
            else:
                self.transitions.append((key, partition, codec.decode(value, Transition)))

    async def dead_letter(self, record: RawRecord, error: str) -> None:
        self.dead.append((record, error))


def make_app(tmp_path: Path, **config) -> tuple[StreamsApp, RecordingSink]:
    sink = RecordingSink()
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="agent-test.")
    cfg = StreamsConfig(app_id="agent-test", data_dir=tmp_path, batch_within_s=0.01, **config)
    return create_app(settings, cfg, sink), sink


async def feed(streams: StreamsApp, messages: list[tuple[bytes, bytes, int]]) -> None:
    """Put (key, value, partition) messages through the agent and wait until all are folded."""
    async with streams.agent.test_context() as agent:
        for key, value, partition in messages:
            await agent.put(value, key=key, partition=partition, wait=False)
        deadline = time.monotonic() + 20
        while streams.counts["records"] < len(messages):
            assert time.monotonic() < deadline, f"agent stuck at {streams.counts}"
            await asyncio.sleep(0.01)


def expected_transitions(events) -> dict[str, Transition]:
    states: dict = {}
    out: dict[str, Transition] = {}
    for event in events:
        states[event.user_id], more = fold.apply(states.get(event.user_id), event)
        out.update((t.transition_id, t) for t in more)
    return out


def user_partition(user_id: str) -> int:
    return int(user_id[1:]) % 3


def test_agent_emits_the_folds_transitions_and_one_state_per_user_per_batch(tmp_path):
    events = causal_events(SyntheticConfig(users=6, sessions=2, steps=3, seed=11))
    streams, sink = make_app(tmp_path, batch_size=40)
    messages = [(e.user_id.encode(), codec.encode(e), user_partition(e.user_id)) for e in events]
    asyncio.run(feed(streams, messages))

    got = {t.transition_id: t for _, _, t in sink.transitions}
    assert len(got) == len(sink.transitions) == 6 * 2 * 3
    assert got == expected_transitions(events)
    # Everything of a user goes to the partition the user's records came from.
    assert all(p == user_partition(k.decode()) for k, p, _ in sink.transitions + sink.states)
    # Batching: a user's state is written at most once per batch.
    batches = streams.counts["batches"]
    assert batches < len(events) and len(sink.states) <= batches * 6
    # The last state sent per user is the table's, and serving can read it as SessionState.
    last = {k: v for k, _, v in sink.states}
    for key, value in last.items():
        assert codec.encode(table_store(streams.table)[key]) == value
        assert codec.decode(value, SessionState).ended
    assert sink.dead == []


def test_the_workers_consumer_hands_whole_fetches_to_the_same_batch_fold(tmp_path):
    from faust.types.tuples import Message

    events = causal_events(SyntheticConfig(users=5, sessions=2, steps=2, seed=4))
    streams, sink = make_app(tmp_path)
    topics = streams.settings.topics
    handlers = installed_batch_handlers(streams.app)
    assert set(handlers) == {topics.slates, topics.feedback}
    # One fold over both topics: a fetch's slates and feedback go to one call.
    merged = merge_by_handler({topics.slates: ["s"], topics.feedback: ["f"]}, handlers)
    assert list(merged.values()) == [["s", "f"]]
    slate_type = type(events[0])
    fetched = [
        Message(
            topic=topics.slates if isinstance(e, slate_type) else topics.feedback,
            partition=user_partition(e.user_id),
            offset=offset,
            timestamp=0.0,
            timestamp_type=0,
            headers=None,
            key=e.user_id.encode(),
            value=codec.encode(e),
            checksum=None,
        )
        for offset, e in enumerate(events)
    ]

    async def deliver_in_fetches_of(size: int) -> None:
        for start in range(0, len(fetched), size):
            await handlers[topics.slates](fetched[start : start + size])

    asyncio.run(deliver_in_fetches_of(7))
    got = {t.transition_id: t for _, _, t in sink.transitions}
    assert len(got) == len(sink.transitions) == 5 * 2 * 2
    assert got == expected_transitions(events)
    assert streams.counts["batches"] == -(-len(events) // 7)


def test_malformed_and_contradicting_records_are_dead_lettered_and_the_rest_flows(tmp_path):
    events = causal_events(SyntheticConfig(users=2, sessions=1, steps=2, seed=3))
    streams, sink = make_app(tmp_path)
    good = [(e.user_id.encode(), codec.encode(e), 0) for e in events]
    first_slate = events[0]
    # A valid item id (the contract bounds them), just not one this slate showed.
    not_shown = next(i for i in range(100) if i not in first_slate.items)
    wrong_click = Click(
        event_id="bad-click", user_id=first_slate.user_id, session_id=first_slate.session_id,
        request_id=first_slate.request_id, item=not_shown, position=0, reward=1.0, ts=1.0,
    )  # fmt: skip
    bad = [
        (b"u0", b"{not json", 0),
        (b"u0", codec.encode(events[0]).replace(b'"v":2', b'"v":9'), 0),
        (b"someone-else", codec.encode(events[0]), 0),  # key is not the record's user
        (first_slate.user_id.encode(), codec.encode(wrong_click), 0),
    ]
    messages = [good[0], *bad, *good[1:]]
    asyncio.run(feed(streams, messages))

    assert [r.value for r, _ in sink.dead] == [v for _, v, _ in bad]
    errors = [e for _, e in sink.dead]
    assert "malformed JSON" in errors[0] and "unsupported schema version" in errors[1]
    assert "is not its user_id" in errors[2] and "is not in slate" in errors[3]
    got = {t.transition_id: t for _, _, t in sink.transitions}
    assert got == expected_transitions(events)


def test_idle_sessions_expire_on_owned_partitions_only(tmp_path):
    one_step = causal_events(SyntheticConfig(users=2, sessions=1, steps=1, seed=5, click_prob=1))
    # Drop the SessionEnds: these sessions never end by themselves.
    events = [e for e in one_step if type(e).__name__ != "SessionEnd"]
    streams, sink = make_app(tmp_path, session_timeout_s=60.0)
    asyncio.run(feed(streams, [(e.user_id.encode(), codec.encode(e), user_partition(e.user_id)) for e in events]))  # fmt: skip
    assert sink.transitions == [] and set(streams.open_sessions) == {b"u0", b"u1"}
    last_ts = max(e.ts for e in events)

    async def sweep(now: float, owned: set[int]) -> int:
        return await streams.expire_idle(now, owned)

    assert asyncio.run(sweep(last_ts + 10, {0, 1})) == 0  # not idle long enough
    assert asyncio.run(sweep(last_ts + 61, {0})) == 1  # u0 is on partition 0, u1 on 1
    (key, partition, t), = sink.transitions  # fmt: skip
    assert (key, partition, t.done, t.request_id) == (b"u0", 0, True, "u0-s0-r0")
    assert set(streams.open_sessions) == {b"u1"}
    assert msgspec.structs.asdict(table_store(streams.table)[b"u0"])["ended"] is True


@pytest.mark.parametrize(
    ("option", "value"),
    [("--batch-size", "0"), ("--batch-within", "0"), ("--session-timeout", "0")],
)
def test_worker_options_are_checked(option, value, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from recloop.cli import _register, app

    _register()
    # An unreachable broker: a bad option must be refused before the broker is checked.
    monkeypatch.setenv("RECLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["streams", option, value])
    assert result.exit_code == 2, result.output
    assert option in " ".join(result.output.split())
    assert "RECLOOP_KAFKA_BOOTSTRAP" not in result.output  # refused before the broker check
