"""A crash between dead-lettering and the commit neither loses nor skips the record.

The simulator dead-letters a slate it cannot show (here: one item short). Its producer holds
records for seconds (``linger.ms``), so the dead letter is still in the process when the
child commits and then kills itself with SIGKILL. The rule under test: a commit first
confirms every pending dead letter. So after the crash the malformed slate is either on
``rec.slates.dlq`` (not lost) or the group's committed offset is not past it (it will be
read again: not skipped). Before the fix the simulator's own dead letters were not marked
pending: the commit went through and the dead letter died with the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from confluent_kafka import TopicPartition

from recloop.core import codec
from recloop.core.dlq import HEADER_OFFSET, HEADER_PARTITION, parse_headers
from recloop.core.events import RecRequest, SlateServed
from recloop.kafka.clients import make_consumer, make_producer

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from recloop.core.settings import Settings
    from recloop.kafka.clients import make_producer
    from recloop.services.sim import PRODUCER_TUNING, SimConfig, SimService

    settings = Settings.model_validate_json(sys.argv[1])
    # Records wait 8 s in the producer: only an explicit flush sends them sooner.
    producer = make_producer(settings, {**PRODUCER_TUNING, "linger.ms": 8000})
    config = SimConfig(preset="tiny_world", users=1, max_sessions=1, seed=3, run_tag=sys.argv[2],
                       slate_timeout_s=0)
    service = SimService(settings, config, producer)
    service.start()
    print("started", flush=True)
    while service.stats.invalid_slates == 0:
        service.step(timeout=0.1)
    service.reader.commit()  # (a round may have committed already: nothing left then)
    print("committed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _first_request(settings, timeout_s: float = 60.0):
    consumer = make_consumer(settings, f"crash-test-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([settings.topics.requests])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(10, timeout=0.2):
                if msg.error() is None:
                    return msg.key(), codec.decode(msg.value(), RecRequest)
    finally:
        consumer.close()
    raise AssertionError("the simulator sent no request")


def _dead_letters(settings, topic: str, timeout_s: float = 5.0) -> list:
    consumer = make_consumer(settings, f"crash-dlq-{uuid.uuid4().hex[:6]}")
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    out, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out += [m for m in consumer.consume(100, timeout=0.2) if m.error() is None]
    consumer.close()
    return out


def test_a_crash_after_the_commit_leaves_the_malformed_slate_dead_lettered_or_unread(
    kafka_settings, tmp_path
) -> None:
    topics = kafka_settings.topics
    run_tag = f"crash{uuid.uuid4().hex[:6]}"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, kafka_settings.model_dump_json(), run_tag],
        stdout=subprocess.PIPE, stderr=(tmp_path / "child.log").open("wb"), text=True,
        env={**os.environ}, start_new_session=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started", (tmp_path / "child.log").read_text()
        key, req = _first_request(kafka_settings)
        bad = SlateServed(
            request_id=req.request_id, user_id=req.user_id, session_id=req.session_id,
            step=req.step, ts=time.time(), request_ts=req.ts, items=req.candidates[: req.k - 1],
            scores=[0.0] * (req.k - 1), propensities=[0.5] * (req.k - 1), policy="broken",
            policy_version=1, candidates=req.candidates, observation=req.observation,
        )  # fmt: skip
        delivered = []
        producer = make_producer(kafka_settings)
        producer.produce(topics.slates, codec.encode(bad), key=key,
                         on_delivery=lambda err, msg: delivered.append(msg))  # fmt: skip
        assert producer.flush(30) == 0 and delivered
        partition, offset = delivered[0].partition(), delivered[0].offset()
        assert child.stdout.readline().strip() == "committed", (tmp_path / "child.log").read_text()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == -9, (tmp_path / "child.log").read_text()[-3000:]

    # The child committed past the malformed slate...
    reader = make_consumer(kafka_settings, topics.group(f"recloop-sim-{run_tag}"))
    [tp] = reader.committed([TopicPartition(topics.slates, partition)], timeout=10)
    reader.close()
    assert tp.offset == offset + 1
    # ...so its dead letter must be on the broker, pointing back at that record.
    letters = _dead_letters(kafka_settings, topics.dlq(topics.slates))
    where = [parse_headers(m.headers()) for m in letters]
    assert [(int(h[HEADER_PARTITION]), int(h[HEADER_OFFSET])) for h in where] == [
        (partition, offset)
    ], "the malformed slate was committed past but its dead letter was lost"
    assert codec.decode(letters[0].value(), SlateServed).items == bad.items
