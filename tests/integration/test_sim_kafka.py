"""``recloop sim`` against the real broker, answered by a small in-test random responder.

tiny_world sessions last exactly ten steps, so U users give exactly 10·U requests, 2·10·U
impressions, one SessionEnd and one EpisodeOutcome each, plus one Click per clicked slate;
before the first request, the world's catalogue on ``items`` and ``catalogue``.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from recloop.core import codec
from recloop.core.catalogue import CatalogueAssembler
from recloop.core.dlq import HEADER_ERROR, HEADER_TOPIC, parse_headers
from recloop.core.events import (
    CatalogueAnnounced,
    Click,
    EpisodeOutcome,
    Feedback,
    Impression,
    ItemChunk,
    RecRequest,
    SessionEnd,
    SlateServed,
)
from recloop.kafka.clients import make_consumer, make_producer
from recloop.services.sim import SimConfig, SimService

pytestmark = pytest.mark.integration

USERS, STEPS = 4, 10  # tiny_world: every session is exactly ten steps


class RandomResponder(threading.Thread):
    """Answers rec.requests with uniform-random slates and honest propensities (k/N).

    ``before_first`` are raw values published to rec.slates, keyed like the first request,
    before answering it; ``ignore_first`` drops the first request unanswered.
    """

    def __init__(self, settings, before_first=(), ignore_first=False) -> None:
        super().__init__(daemon=True)
        self.settings, self.before_first, self.ignore_first = (
            settings,
            list(before_first),
            ignore_first,
        )
        self.answered: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        topics = self.settings.topics
        consumer = make_consumer(self.settings, f"responder-{uuid.uuid4().hex[:6]}")
        consumer.subscribe([topics.requests])
        producer = make_producer(self.settings)
        rng, first = random.Random(0), True
        while not self.stop.is_set():
            for msg in consumer.consume(num_messages=100, timeout=0.02):
                if msg.error():
                    continue
                req = codec.decode(msg.value(), RecRequest)
                if first:
                    first = False
                    for value in self.before_first:
                        producer.produce(topics.slates, value(req), key=msg.key())
                    if self.ignore_first:
                        continue
                items = rng.sample(req.candidates, req.k)
                p = req.k / len(req.candidates)
                served = SlateServed(
                    request_id=req.request_id,
                    user_id=req.user_id,
                    session_id=req.session_id,
                    step=req.step,
                    ts=time.time(),
                    request_ts=req.ts,
                    items=items,
                    scores=[0.0] * req.k,
                    propensities=[p] * req.k,
                    policy="random",
                    policy_version=3,
                    candidates=req.candidates,
                    observation=req.observation,
                )
                producer.produce(topics.slates, codec.encode(served), key=msg.key())
                self.answered.append(req.request_id)
            producer.poll(0)
        producer.flush(10)
        consumer.close()


def run_sim(settings, responder: RandomResponder, **config) -> SimService:
    service = SimService(
        settings, SimConfig(preset="tiny_world", users=USERS, max_sessions=USERS, seed=7, **config)
    )
    responder.start()
    deadline = time.monotonic() + 60
    try:
        service.run(lambda: time.monotonic() > deadline)
    finally:
        responder.stop.set()
        responder.join(20)
    return service


def read_topic(settings, topic: str, expect: int, extra_s: float = 0.5, timeout_s: float = 30.0):
    """Every message of ``topic`` (all partitions, from the start), in partition-offset order.

    Reads until ``expect`` messages arrived, then ``extra_s`` longer, so that a surplus shows.
    """
    consumer = make_consumer(settings, f"reader-{uuid.uuid4().hex[:6]}")
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    out, deadline, settle = [], time.monotonic() + timeout_s, None
    while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
        out.extend(m for m in consumer.consume(num_messages=500, timeout=0.1) if not m.error())
        if settle is None and len(out) >= expect:
            settle = time.monotonic() + extra_s
    consumer.close()
    return out


def test_users_produce_exactly_the_expected_events(kafka_settings) -> None:
    topics = kafka_settings.topics
    responder = RandomResponder(kafka_settings)
    service = run_sim(kafka_settings, responder)
    stats = service.stats
    assert stats.outcomes == USERS and stats.retries == 0 and stats.slates == USERS * STEPS

    requests = read_topic(kafka_settings, topics.requests, USERS * STEPS)
    assert len(requests) == USERS * STEPS
    # The world's catalogue was complete on items + catalogue before the first request.
    announced = read_topic(kafka_settings, topics.catalogue, 1)
    assert len(announced) == 1
    announcement = codec.decode(announced[0].value(), CatalogueAnnounced)
    assert announcement.sha256 == service.world.item_catalogue.sha256
    assert announced[0].timestamp()[1] <= min(m.timestamp()[1] for m in requests)
    assembler = CatalogueAssembler()
    for msg in read_topic(kafka_settings, topics.items, 1):
        assembler.add_chunk(codec.decode(msg.value(), ItemChunk))
    assembler.announce(announcement)
    installed = assembler.install()
    assert installed is not None and installed.version == 1
    np.testing.assert_array_equal(installed.features_NF, service.world.catalogue.features_NF)
    steps_by_user = defaultdict(list)
    for msg in requests:
        req = codec.decode(msg.value(), RecRequest)
        assert msg.key() == req.user_id.encode()
        steps_by_user[req.user_id].append(req.step)
    assert sorted(steps_by_user.values()) == [list(range(STEPS))] * USERS  # in order, per user

    feedback = defaultdict(list)
    partition_of = {}
    for msg in read_topic(kafka_settings, topics.feedback, stats.feedback):
        event = codec.decode(msg.value(), Feedback)
        assert msg.key() == event.user_id.encode()
        assert partition_of.setdefault(event.user_id, msg.partition()) == msg.partition()
        feedback[event.user_id].append(event)
    assert sorted(feedback) == sorted(steps_by_user)

    outcomes = {}
    for msg in read_topic(kafka_settings, topics.outcomes, USERS):
        outcome = codec.decode(msg.value(), EpisodeOutcome)
        assert msg.key() == outcome.user_id.encode()
        outcomes[outcome.user_id] = outcome
    assert sorted(outcomes) == sorted(steps_by_user)

    for user, events in feedback.items():
        clicks = _check_causal_order(events)
        outcome = outcomes[user]
        assert outcome.steps == STEPS and outcome.clicks == len(clicks)
        assert outcome.total_return == pytest.approx(sum(c.reward for c in clicks))
        assert outcome.policy_steps == {"random:3": STEPS}


def _check_causal_order(events) -> list[Click]:
    """Per step: two Impressions (positions 0, 1), a Click iff one is flagged; then SessionEnd."""
    clicks, i = [], 0
    for step in range(STEPS):
        imps = events[i : i + 2]
        assert all(isinstance(e, Impression) for e in imps), events[i : i + 3]
        assert [e.position for e in imps] == [0, 1] and imps[0].request_id == imps[1].request_id
        assert imps[0].request_id.endswith(f"-r{step}")
        i += 2
        flagged = [e for e in imps if e.clicked]
        if flagged:
            click = events[i]
            assert isinstance(click, Click) and click.item == flagged[0].item
            assert click.request_id == imps[0].request_id and click.reward == 1.0
            clicks.append(click)
            i += 1
    assert isinstance(events[i], SessionEnd) and events[i].steps == STEPS and i == len(events) - 1
    return clicks


def test_malformed_slates_go_to_the_dlq_and_the_simulator_keeps_running(kafka_settings) -> None:
    topics = kafka_settings.topics

    def repeated_items(req: RecRequest) -> bytes:
        item = req.candidates[0]
        return codec.encode(
            SlateServed(
                request_id=req.request_id,
                user_id=req.user_id,
                session_id=req.session_id,
                step=req.step,
                ts=time.time(),
                request_ts=req.ts,
                items=[item] * req.k,
                scores=[0.0] * req.k,
                propensities=[1.0] * req.k,
                policy="broken",
                policy_version=0,
            )
        )

    responder = RandomResponder(
        kafka_settings, before_first=[lambda req: b"{not a slate", repeated_items]
    )
    service = run_sim(kafka_settings, responder)
    stats = service.stats
    assert stats.undecodable_slates == 1 and stats.invalid_slates == 1
    assert stats.outcomes == USERS and stats.slates == USERS * STEPS  # nobody was stuck

    dead = read_topic(kafka_settings, topics.dlq(topics.slates), 2)
    assert len(dead) == 2
    errors = sorted(parse_headers(m.headers())[HEADER_ERROR] for m in dead)
    assert "cannot decode SlateServed" in errors[0] and "repeats an item" in errors[1]
    assert all(parse_headers(m.headers())[HEADER_TOPIC] == topics.slates for m in dead)
    assert b"{not a slate" in [m.value() for m in dead]


def test_an_unanswered_request_is_retried_never_made_up(kafka_settings) -> None:
    responder = RandomResponder(kafka_settings, ignore_first=True)
    service = run_sim(kafka_settings, responder, slate_timeout_s=1.0)
    stats = service.stats
    assert stats.retries >= 1
    assert stats.outcomes == USERS and stats.slates == USERS * STEPS
    # Every shown slate is one the responder sent: one answer per request, none invented.
    assert len(responder.answered) == USERS * STEPS
    impressions = [
        e
        for m in read_topic(kafka_settings, kafka_settings.topics.feedback, stats.feedback)
        if isinstance(e := codec.decode(m.value(), Feedback), Impression)
    ]
    assert {e.request_id for e in impressions} == set(responder.answered)
