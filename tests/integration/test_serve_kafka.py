"""``recloop serve``'s shell on the real broker: slates out, DLQ, refused snapshots, live swaps.

The service runs in a thread of the test process against the session's Kafka broker, after
the test published the catalogue (``publish_catalogue``: items + catalogue topics), its only
source of items and features. Its policies come from snapshots of a tiny test policy (a score per item, stored as the
snapshot's only tensor) through an injected loader, so these tests do not depend on the
learner's algorithms.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaError, Message

from recloop.core import codec
from recloop.core.catalogue import ItemCatalogue
from recloop.core.dlq import (
    HEADER_CONSUMER,
    HEADER_ERROR,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    parse_headers,
)
from recloop.core.events import PolicyPublished, RecRequest, SessionState, SlateServed, UserView
from recloop.core.ports import Slate
from recloop.core.settings import Settings
from recloop.core.snapshot import WEIGHTS_FILE, announced_path, write_snapshot
from recloop.kafka.bus import KafkaBus
from recloop.kafka.catalogue import publish_catalogue
from recloop.kafka.clients import DeliveryTracker, flush_or_raise, make_consumer, make_producer
from recloop.services.serve import ServeOptions, ServeService
from recloop.serving.server import ServeConfig
from recloop.serving.split import TrafficSplit

pytestmark = pytest.mark.integration

N_ITEMS = 12
K = 3
CATALOGUE = ItemCatalogue(np.array([[float(j), 1.0] for j in range(N_ITEMS)], np.float32))


class ScorePolicy:
    """A fixed score per item id, read from the snapshot's ``scores_I``; top-K."""

    name = "scored"

    def __init__(self, scores_I: np.ndarray) -> None:
        self.scores_I = scores_I

    def recommend(self, observation, candidates, k):
        scores_N = self.scores_I[candidates.ids]
        top_K = np.argsort(-scores_N, kind="stable")[:k]
        return Slate(candidates.ids[top_K], scores_N[top_K], np.ones(k))


def load_score_policy(algorithm, tensors, manifest):
    return ScorePolicy(tensors["scores_I"])


def snapshot(root: Path, version: int, scores_I: np.ndarray) -> PolicyPublished:
    manifest = {"algorithm": "score", "config": {}, "metrics": {}, "consumed_offsets": {},
                "transitions_applied": version}  # fmt: skip
    # Under the snapshot root of kafka_settings (home ``root``), named relative to it.
    ref = write_snapshot(root / "snapshots", "learned", version, {"scores_I": scores_I}, manifest)
    return PolicyPublished(
        policy="learned", algorithm="score", version=version,
        path=announced_path(root / "snapshots", ref.path),
        weights_sha256=ref.weights_sha256, manifest_sha256=ref.manifest_sha256,
        created_ts=ref.created_ts,
    )  # fmt: skip


def top_items_of(version: int) -> list[int]:
    """Version v ranks items (v, v+1, ...) first: each version serves a different slate."""
    return [(version + i) % N_ITEMS for i in range(K)]


def scores_of(version: int) -> np.ndarray:
    scores_I = np.zeros(N_ITEMS)
    scores_I[top_items_of(version)] = [3.0, 2.0, 1.0]
    return scores_I


def request(i: int, **overrides) -> RecRequest:
    fields = dict(request_id=f"r{i}", user_id=f"u{i % 17}", session_id=f"s{i % 17}", step=i,
                  ts=time.time(), k=K, observation=[0.25, float(i)],
                  candidates=list(range(N_ITEMS)))  # fmt: skip
    fields.update(overrides)
    return RecRequest(**fields)


class Client:
    """Sends requests and announcements; reads slates and dead letters back.

    ``placed`` maps each delivered message's (topic, value) to the (partition, offset) its
    delivery report gave, so a dead letter's source headers can be checked exactly.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.producer = make_producer(settings)
        self.tracker = DeliveryTracker()
        self.placed: dict[tuple[str, bytes], tuple[int, int]] = {}
        group = f"test-client-{uuid.uuid4().hex[:8]}"
        self.slates = make_consumer(settings, group)
        self.slates.subscribe([self.topics.slates])
        self.dlq = make_consumer(settings, group + "-dlq")
        self.dlq.subscribe([self.topics.dlq(self.topics.requests)])

    def send(self, topic: str, key: str, value: bytes) -> None:
        self.producer.produce(topic, key=key.encode(), value=value, on_delivery=self._delivered)
        self.producer.poll(0)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        self.tracker(err, msg)
        if err is None:
            self.placed[(msg.topic(), msg.value())] = (msg.partition(), msg.offset())

    def send_request(self, req: RecRequest) -> None:
        self.send(self.topics.requests, req.user_id, codec.encode(req))

    def announce(self, published: PolicyPublished) -> None:
        self.send(self.topics.snapshots, published.policy, codec.encode(published))
        self.flush()

    def flush(self) -> None:
        flush_or_raise(self.producer, self.tracker)

    def read(self, consumer: Consumer, want: int, timeout: float = 30.0) -> list:
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            for msg in consumer.consume(100, timeout=0.2):
                if msg.error() is None:
                    got.append(msg)
        return got

    def read_slates(self, want: int, timeout: float = 30.0) -> list[SlateServed]:
        msgs = self.read(self.slates, want, timeout)
        return [codec.decode(m.value(), SlateServed) for m in msgs]

    def close(self) -> None:
        self.slates.close()
        self.dlq.close()


def publish_test_catalogue(settings: Settings) -> None:
    """``CATALOGUE`` on the items + catalogue topics, as a simulator publishes its world's."""
    bus = KafkaBus(settings, process="test-catalogue")
    publish_catalogue(bus, settings.topics, CATALOGUE, timeout=30)


@contextmanager
def running_service(settings: Settings, config: ServeConfig) -> Iterator[ServeService]:
    publish_test_catalogue(settings)
    service = ServeService(
        settings, config, load_score_policy,
        options=ServeOptions(batch_size=64, commit_every_s=0.5,
                             group_id=f"serve-{uuid.uuid4().hex[:8]}"),
    )  # fmt: skip
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        assert service.ready.wait(60), "the request consumer never got its partitions"
        yield service
    finally:
        service.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the service did not stop"


def _config(fallback: str = "uniform") -> ServeConfig:
    return ServeConfig(TrafficSplit.parse(["learned"]), fallback=fallback)


def _wait_version(service: ServeService, version: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while service.host.version("learned") != version and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.host.version("learned") == version, service.snapshot_stats()


def test_requests_in_slates_out_and_malformed_requests_to_the_dlq(kafka_settings: Settings):
    client = Client(kafka_settings)
    # A session state for user u1 reaches the local cache; slates still echo the request.
    state = SessionState(user_id="u1", session_id="s1", view=UserView(history=[4, 5], step=1))
    client.send(kafka_settings.topics.session_state, "u1", codec.encode(state))
    good_before = [request(i) for i in range(5)]
    for req in good_before:
        client.send_request(req)
    bad = [b"{not json", codec.encode(request(90)).replace(b'"k":3', b'"k":-1')]
    for value in bad:
        client.send(kafka_settings.topics.requests, "u-bad", value)
    unanswerable = request(91, k=N_ITEMS + 1)  # decodes, but asks for more than it offers
    client.send_request(unanswerable)
    good_after = [request(i) for i in range(5, 10)]
    for req in good_after:
        client.send_request(req)
    client.flush()

    with running_service(kafka_settings, _config()) as service:
        slates = client.read_slates(10)
        dead = client.read(client.dlq, 3)
        deadline = time.monotonic() + 30
        while len(service.cache) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = service.snapshot_stats()
        cached = service.cache.view("u1", "s1")
    client.close()

    by_id = {s.request_id: s for s in slates}
    assert sorted(by_id) == sorted(r.request_id for r in good_before + good_after)
    for req in good_before + good_after:
        slate = by_id[req.request_id]
        assert (slate.user_id, slate.session_id, slate.step) == (
            req.user_id,
            req.session_id,
            req.step,
        )
        assert slate.request_ts == req.ts and slate.ts >= req.ts
        # The arm serves version 0 before its first snapshot.
        assert slate.policy == "learned" and slate.policy_version == 0
        assert len(set(slate.items)) == K and set(slate.items) <= set(req.candidates)
        assert slate.propensities == [K / N_ITEMS] * K and len(slate.scores) == K
        assert slate.candidates == req.candidates  # ids only (schema v2): no feature rows
        assert slate.observation == req.observation

    assert len(dead) == 3
    headers = [parse_headers(m.headers()) for m in dead]
    assert all(h[HEADER_TOPIC] == kafka_settings.topics.requests for h in headers)
    assert all(h[HEADER_CONSUMER] == "recloop-serve" for h in headers)
    for m, h in zip(dead, headers, strict=True):  # each names the very record it carries
        partition, offset = client.placed[(kafka_settings.topics.requests, m.value())]
        assert h[HEADER_PARTITION] == str(partition) and h[HEADER_OFFSET] == str(offset)
    undecodable = [m for m in dead if m.value() in bad]
    assert sorted(m.value() for m in undecodable) == sorted(bad)
    (rest,) = [m for m in dead if m.value() not in bad]
    assert codec.decode(rest.value(), RecRequest) == unanswerable
    rest_headers = parse_headers(rest.headers())
    assert "unanswerable" in rest_headers[HEADER_ERROR]
    assert stats["slates"] == 10 and stats["undecodable"] == 2 and stats["invalid"] == 1
    assert stats["sessions_cached"] == 1 and cached is not None and cached.history == [4, 5]
    assert stats["catalogue"]["version"] == 1 and stats["catalogue"]["n_items"] == N_ITEMS


def test_tampered_snapshot_is_refused_and_serving_keeps_answering(
    kafka_settings: Settings, tmp_path: Path
):
    client = Client(kafka_settings)
    with running_service(kafka_settings, _config()) as service:
        client.announce(snapshot(tmp_path, 1, scores_of(1)))
        _wait_version(service, 1)

        tampered = snapshot(tmp_path, 2, scores_of(2))
        weights = tmp_path / "snapshots" / tampered.path / WEIGHTS_FILE
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # flip the bits of the last tensor byte
        weights.write_bytes(bytes(data))
        client.announce(tampered)
        deadline = time.monotonic() + 30
        while service.installer.counts["refused"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.installer.counts["refused"] == 1, (
            list(service.stats.installs),
            service.snapshot_stats(),
        )
        assert "SHA-256" in service.installer.last_refusal

        reqs = [request(i) for i in range(20)]
        for req in reqs:
            client.send_request(req)
        client.flush()
        slates = client.read_slates(20)
    client.close()

    assert sorted(s.request_id for s in slates) == sorted(r.request_id for r in reqs)
    assert {(s.policy, s.policy_version) for s in slates} == {("learned", 1)}
    assert all(s.items == top_items_of(1) and s.propensities == [1.0] * K for s in slates)


def test_swaps_under_steady_load_lose_nothing_and_never_go_backwards(
    kafka_settings: Settings, tmp_path: Path
):
    client = Client(kafka_settings)
    rate, seconds, versions = 150.0, 6.0, [1, 2, 3, 4, 5]
    sent: list[RecRequest] = []
    with running_service(kafka_settings, _config()) as service:

        def load() -> None:
            start = time.monotonic()
            i = 0
            while time.monotonic() - start < seconds:
                req = request(1000 + i)
                client.send_request(req)
                sent.append(req)
                i += 1
                time.sleep(max(0.0, start + i / rate - time.monotonic()))

        loader = threading.Thread(target=load)
        loader.start()
        # Announce a new version every second while the load runs (and one stale replay).
        for version in versions:
            time.sleep(seconds / (len(versions) + 1))
            client.announce(snapshot(tmp_path, version, scores_of(version)))
            if version == 3:
                client.announce(snapshot_replay(tmp_path, 1))
        loader.join()
        client.flush()
        slates_msgs = client.read(client.slates, len(sent), timeout=60)
        final_version = service.host.version("learned")
        stats = service.snapshot_stats()
    client.close()

    slates = [
        (m.partition(), m.offset(), codec.decode(m.value(), SlateServed)) for m in slates_msgs
    ]
    answered = [s.request_id for _, _, s in slates]
    assert len(answered) == len(set(answered)), "a request was answered twice"
    assert sorted(answered) == sorted(r.request_id for r in sent), "missing slates"
    assert stats["policy_errors"] == 0 and stats["invalid"] == 0
    assert final_version == versions[-1]

    # Version 0 of the arm is its fallback, served before the first snapshot arrived.
    served_versions = {
        s.policy_version for _, _, s in slates if s.policy == "learned" and s.policy_version
    }
    assert len(served_versions) >= 3, f"too few versions served under load: {served_versions}"
    for _, _, s in slates:  # every slate is the one its tagged version draws
        if s.policy == "learned" and s.policy_version:
            assert s.items == top_items_of(s.policy_version), s
    # Never backwards: per partition in log order, and globally in serving-time order.
    for partition in {p for p, _, _ in slates}:
        ordered = sorted((o, s.policy_version) for p, o, s in slates if p == partition)
        tagged = [v for _, v in ordered]
        assert tagged == sorted(tagged), f"partition {partition} went backwards: {tagged}"
    by_time = [s.policy_version for _, _, s in sorted(slates, key=lambda x: x[2].ts)]
    assert by_time == sorted(by_time)


def snapshot_replay(root: Path, version: int) -> PolicyPublished:
    """The announcement of an already-written old version again (a compacted-topic replay)."""
    from recloop.core.snapshot import describe_snapshot, snapshot_dir

    ref = describe_snapshot(snapshot_dir(root / "snapshots", "learned", version))
    return PolicyPublished(
        policy="learned", algorithm="score", version=version,
        path=announced_path(root / "snapshots", ref.path),
        weights_sha256=ref.weights_sha256, manifest_sha256=ref.manifest_sha256,
        created_ts=ref.created_ts,
    )  # fmt: skip


def test_a_restarted_server_answers_with_the_announced_version_from_its_first_request(
    kafka_settings: Settings, tmp_path: Path
):
    """A server (re)started with snapshots already announced and requests already waiting
    installs the newest snapshot before it reads a request: no slate of the learned arm
    goes out at the cold-start fallback's version 0, so served versions never go backwards
    across a restart."""
    client = Client(kafka_settings)
    try:
        for version in (1, 2, 3):
            client.announce(snapshot(tmp_path, version, scores_of(version)))
        for i in range(20):
            client.send_request(request(i))
        client.flush()
        with running_service(kafka_settings, _config()):
            slates = client.read_slates(20)
        assert len(slates) == 20
        assert {s.policy_version for s in slates} == {3}, [s.policy_version for s in slates]
        assert all(s.items == top_items_of(3) for s in slates)
    finally:
        client.close()
