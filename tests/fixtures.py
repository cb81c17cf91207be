"""Test fixtures for the wire: one plausible record of every event type, and its topic and key.

``example_events`` covers ``recloop.core.events.ALL_RECORD_TYPES`` (a test checks it does),
the item chunk and announcement of ``example_catalogue`` among them;
``topic_for`` and ``key_of`` read the topic table the way a producer must; ``round_trip``
produces records to a real broker and reads them back through the DLQ consumer.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from recloop.core import events, topics
from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Record
from recloop.core.settings import Settings


def example_catalogue() -> ItemCatalogue:
    """Twelve items of two features (ids 0..11: every item the example records name)."""
    return ItemCatalogue(np.arange(24, dtype=np.float32).reshape(12, 2) / 8.0, version=1)


def example_events(ts: float = 1_700_000_000.0) -> list[Record]:
    """One plausible record of every type in ``recloop.core.events.ALL_RECORD_TYPES``."""
    view = events.UserView(
        observation=[0.25, -1.0], history=[7, 3], history_rewards=[1.5, 0.0], step=2,
        cumulative_reward=1.5,
    )  # fmt: skip
    pending = events.PendingSlate(
        request_id="r-2", step=1, items=[3, 9], propensities=[0.5, 0.25], policy="reinforce",
        policy_version=4, candidates=[3, 9, 11], served_ts=ts, impressed_positions=[0],
    )  # fmt: skip
    uid, sid = "u-1", "s-1"
    catalogue = example_catalogue()
    return [
        events.RecRequest(
            request_id="r-1", step=0, ts=ts, k=2, observation=[0.25, -1.0],
            candidates=[3, 9, 11], user_id=uid, session_id=sid,
        ),
        events.SlateServed(
            request_id="r-1", step=0, ts=ts + 0.01, request_ts=ts, items=[9, 3],
            scores=[2.5, -0.5], propensities=[0.7, 0.3], policy="reinforce", policy_version=4,
            candidates=[3, 9, 11], user_id=uid, session_id=sid,
        ),
        events.Impression(
            event_id="e-1", request_id="r-1", item=9, position=0, slate_size=2, clicked=True,
            ts=ts + 0.02, user_id=uid, session_id=sid,
        ),
        events.Click(
            event_id="e-2", request_id="r-1", item=9, position=0, reward=3.25, ts=ts + 0.03,
            user_id=uid, session_id=sid,
        ),
        events.SessionEnd(
            event_id="e-3", steps=1, ts=ts + 0.04, reason="budget", user_id=uid, session_id=sid,
        ),
        events.SessionState(
            view=view, frontier=view, pending=[pending], done_requests=["r-0"],
            early_feedback=[
                events.Click(
                    event_id="e-0", request_id="r-2", item=3, position=0, reward=1.0, ts=ts,
                    user_id=uid, session_id=sid,
                )
            ],
            ended=False, last_event_ts=ts, user_id=uid, session_id=sid,
        ),
        events.Transition(
            transition_id="u-1/s-1/r-1", request_id="r-1", state=view, slate=[9, 3],
            propensities=[0.7, 0.3], candidates=[3, 9, 11], policy="reinforce",
            policy_version=4, chosen_item=9, chosen_position=0, reward=3.25, next_state=view,
            done=True, served_ts=ts, outcome_ts=ts + 0.03, user_id=uid, session_id=sid,
        ),
        events.PolicyPublished(
            policy="reinforce", algorithm="topk-reinforce", version=4, path="snapshots/4",
            weights_sha256="ab" * 32, manifest_sha256="cd" * 32, created_ts=ts,
            transitions_applied=128, metrics={"loss": 0.5},
        ),
        events.EpisodeOutcome(
            ts=ts + 0.05, total_return=3.25, steps=1, clicks=1, clicked_quality_sum=0.75,
            policy_steps={"reinforce:4": 1}, user_id=uid, session_id=sid,
        ),
        *catalogue.chunks(ts=ts),
        catalogue.announcement(ts=ts),
    ]  # fmt: skip


def topic_for(record_type: type[Record]) -> str:
    """The base topic name whose value type includes ``record_type``."""
    for spec in topics.TOPIC_TABLE:
        value = spec.value
        members = getattr(value, "__args__", (value,))
        if record_type in members:
            return spec.base_name
    raise KeyError(f"no topic carries {record_type.__name__}")


def key_of(record: Record) -> str:
    """The partition key the topic table names for ``record``'s topic: the named field's
    value, or the name itself where the record has no such field (``catalogue``: one key)."""
    spec = topics.spec(topic_for(type(record)))
    value = getattr(record, spec.key, None)
    return spec.key if value is None else str(value)


def round_trip(settings: Settings, records: list[Record], timeout: float = 30.0) -> list[Any]:
    """Produce ``records`` to their topics and read them back through the DLQ consumer.

    Returns the consumed messages equal to the records, in the order sent; a record not seen
    within ``timeout`` is missing from the result. Older messages on the topics (an earlier
    run's) are read past, so callers should make their records unique (a fresh ``ts``).
    """
    from recloop.kafka.clients import (
        DeliveryTracker,
        flush_or_raise,
        make_producer,
        produce_records,
    )
    from recloop.kafka.dlq import DeadLetterConsumer

    producer = make_producer(settings)
    tracker = DeliveryTracker()
    for record in records:
        topic = settings.topics.name(topic_for(type(record)))
        produce_records(producer, topic, [record], key_of, on_delivery=tracker)
    flush_or_raise(producer, tracker)

    bases = sorted({topic_for(type(r)) for r in records})
    group = f"{settings.topic_prefix}demo-{time.time_ns()}"
    found: dict[int, Any] = {}
    with DeadLetterConsumer(settings, bases, group, name="recloop-demo") as consumer:
        deadline = time.monotonic() + timeout
        while len(found) < len(records) and time.monotonic() < deadline:
            for consumed in consumer.poll_batch(100, timeout=0.5):
                for i, record in enumerate(records):
                    if i not in found and consumed.value == record:
                        found[i] = consumed
                        break
        consumer.commit()
    return [found[i] for i in sorted(found)]
