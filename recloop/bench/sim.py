"""``recloop bench sim``: how fast the simulator runs, in process and through Kafka.

Three figures from one run, on the same machine:

1. in-process user-steps/s: ``producer_sim.runner`` with a uniform-random policy (policy
   calls included) and the bare vectorised world step (no policy, no events);
2. events/s through Kafka: ``recloop sim`` against a uniform-random responder running in a
   second process (it consumes rec.requests and publishes SlateServed, as serving would);
   events = every message the simulator published (requests, impressions, clicks, session
   ends, outcomes) plus the slates it consumed; the catalogue it publishes once before its
   first request is left out of the counts and of the mean message size;
3. raw confluent-kafka produce rate for messages of the simulator's mean message size, with
   the same producer settings, as the ceiling to compare with.

It ends with one JSON line of every figure.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recloop.core import codec
from recloop.core.events import RecRequest, SlateServed
from recloop.core.settings import Settings
from recloop.kafka.clients import (
    DeliveryTracker,
    flush_or_raise,
    make_consumer,
    make_producer,
    produce_retrying,
)
from recloop.kafka.outbox import Outbox
from recloop.producer_sim.policies import RandomPolicy
from recloop.producer_sim.presets import make_world
from recloop.producer_sim.runner import run_episodes
from recloop.producer_sim.world import Simulation
from recloop.services.sim import PRODUCER_TUNING, SimConfig, SimService


def world_step_rate(preset: str, users: int = 4096, steps: int = 200, seed: int = 0) -> float:
    """User-steps/s of the bare vectorised world: random slates, no policy calls, no events."""
    world = make_world(preset, seed=seed)
    sim = Simulation(world, users, seed)
    slots = np.arange(users)
    sim.spawn(slots)
    rng = np.random.default_rng(seed)
    k, done = world.slate_size, 0
    t0 = time.perf_counter()
    for _ in range(steps):
        cands_UC = sim.candidates(slots)
        if cands_UC is None:
            slate_UK = rng.integers(0, world.catalogue.n_items, size=(users, k))
        else:
            slate_UK = cands_UC[:, :k]  # candidates are a uniform draw: their head is random
        out = sim.step(slots, slate_UK)
        done += users
        if out.done_U.any():
            sim.spawn(slots[out.done_U])
    return done / (time.perf_counter() - t0)


def runner_step_rate(preset: str, episodes: int, seed: int = 0) -> float:
    """User-steps/s of the in-process runner with RandomPolicy (one policy call per step)."""
    report = run_episodes(
        make_world(preset, seed=seed), RandomPolicy(seed), episodes, seed, users_in_parallel=256
    )
    return report.user_steps_per_s


def serve_random(bootstrap: str, prefix: str, n_items: int, stop, cpu_out, seed: int = 0) -> None:
    """A uniform-random 'serving' in its own process: answer every request on rec.requests.

    Runs until ``stop`` (an Event) is set, then puts its CPU seconds on ``cpu_out``.
    """
    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
    topics = settings.topics
    consumer = make_consumer(settings, f"bench-responder-{prefix}", {"fetch.wait.max.ms": 5})
    consumer.subscribe([topics.requests])
    producer = make_producer(settings, PRODUCER_TUNING)
    tracker = DeliveryTracker()
    outbox = Outbox(producer, tracker)
    rng = random.Random(seed)
    cpu0 = time.process_time()
    while not stop.is_set():
        for msg in consumer.consume(num_messages=5000, timeout=0.05):
            if msg.error():
                continue
            req: RecRequest = codec.decode(msg.value(), RecRequest)
            pool = req.candidates or range(n_items)
            served = SlateServed(
                request_id=req.request_id,
                user_id=req.user_id,
                session_id=req.session_id,
                step=req.step,
                ts=time.time(),
                request_ts=req.ts,
                items=rng.sample(pool, req.k),
                scores=[0.0] * req.k,
                propensities=[req.k / len(pool)] * req.k,
                policy="random",
                policy_version=0,
                candidates=req.candidates,
                observation=req.observation,
            )
            outbox.add(topics.slates, msg.key(), codec.encode(served))
        outbox.send()
        producer.poll(0)
    cpu_out.put(time.process_time() - cpu0)
    producer.flush(10)
    consumer.close()


@dataclass(frozen=True)
class KafkaFigures:
    events_per_s: float
    published_per_s: float
    user_steps_per_s: float
    mean_message_bytes: float
    seconds: float
    sim_cpu_share: float
    responder_cpu_share: float


def kafka_sim_rate(settings: Settings, preset: str, users: int, seconds: float) -> KafkaFigures:
    """Run SimService against a random responder process for ``seconds``."""
    ctx = mp.get_context("spawn")
    stop, cpu_out = ctx.Event(), ctx.Queue()
    service = SimService(settings, SimConfig(preset=preset, users=users, duration_s=seconds))
    n_items = service.world.catalogue.n_items
    responder = ctx.Process(
        target=serve_random,
        args=(settings.kafka_bootstrap, settings.topic_prefix, n_items, stop, cpu_out),
        daemon=True,
    )
    responder.start()
    time.sleep(3.0)  # let the responder join its group before requests flow
    cpu0 = time.process_time()
    stats = service.run()
    sim_cpu = time.process_time() - cpu0
    stop.set()
    responder_cpu = cpu_out.get(timeout=30)
    responder.join(10)
    wall = stats.elapsed_s
    out = service.outbox_totals
    # The catalogue's chunks and announcement, published once at the start, are no events.
    catalogue = service.world.item_catalogue
    records = [*catalogue.chunks(ts=0.0), catalogue.announcement(ts=0.0)]
    messages = out.messages - len(records)
    sent = out.bytes - sum(len(codec.encode(r)) for r in records)
    return KafkaFigures(
        events_per_s=(stats.published + stats.slates) / wall,
        published_per_s=stats.published / wall,
        user_steps_per_s=stats.slates / wall,
        mean_message_bytes=sent / max(messages, 1),
        seconds=wall,
        sim_cpu_share=sim_cpu / wall,
        responder_cpu_share=responder_cpu / wall,
    )


def raw_produce_rate(settings: Settings, size: int, n: int = 300_000) -> float:
    """Messages/s of a bare confluent-kafka producer (same settings) for ``size``-byte values."""
    producer = make_producer(settings, PRODUCER_TUNING)
    tracker = DeliveryTracker()
    value = b"x" * size
    topic = settings.topics.feedback
    t0 = time.perf_counter()
    for i in range(n):
        produce_retrying(producer, topic, b"u%d" % (i % 1000), value, on_delivery=tracker)
        if i % 1000 == 0:
            producer.poll(0)
    flush_or_raise(producer, tracker, 60)
    return n / (time.perf_counter() - t0)


def run_bench(bootstrap: str | None, preset: str, users: int, seconds: float, console) -> dict:
    """Every figure of the benchmark, printing as it goes; returns them as a dict."""
    from recloop.kafka.admin import create_topics

    figures: dict[str, float | str] = {"preset": preset, "users": users}
    figures["world_user_steps_per_s"] = world_step_rate(preset)
    console.print(
        f"in-process world step (vectorised, no policy): {figures['world_user_steps_per_s']:,.0f} user-steps/s"
    )
    figures["runner_user_steps_per_s"] = runner_step_rate(preset, episodes=300)
    console.print(
        f"in-process runner with RandomPolicy: {figures['runner_user_steps_per_s']:,.0f} user-steps/s"
    )

    broker = None
    if bootstrap is None:
        from recloop.ops.broker import LocalBroker

        console.print("starting a local Kafka broker (pass --bootstrap to use yours)...")
        broker = LocalBroker(
            Path(tempfile.mkdtemp(prefix="recloop-bench-")), die_with_parent=True
        ).start()
        bootstrap = broker.bootstrap
    try:
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=f"bench-{int(time.time())}.")
        create_topics(settings)
        kafka = kafka_sim_rate(settings, preset, users, seconds)
        console.print(
            f"through Kafka: {kafka.events_per_s:,.0f} events/s "
            f"({kafka.published_per_s:,.0f} published + slates consumed; "
            f"{kafka.user_steps_per_s:,.0f} user-steps/s; mean message {kafka.mean_message_bytes:.0f} B)"
        )
        console.print(
            f"CPU busy: simulator {kafka.sim_cpu_share:.0%}, responder {kafka.responder_cpu_share:.0%} "
            f"of the run; {kafka.events_per_s / max(kafka.sim_cpu_share, 1e-9):,.0f} events per "
            "simulator CPU-second (what a free core would carry)"
        )
        raw = raw_produce_rate(settings, int(round(kafka.mean_message_bytes)))
        console.print(
            f"raw confluent-kafka produce, {kafka.mean_message_bytes:.0f} B messages: {raw:,.0f} msg/s"
        )
        figures.update(
            kafka_events_per_s=kafka.events_per_s,
            kafka_published_per_s=kafka.published_per_s,
            kafka_user_steps_per_s=kafka.user_steps_per_s,
            mean_message_bytes=kafka.mean_message_bytes,
            sim_cpu_share=kafka.sim_cpu_share,
            events_per_sim_cpu_s=kafka.events_per_s / max(kafka.sim_cpu_share, 1e-9),
            responder_cpu_share=kafka.responder_cpu_share,
            raw_produce_per_s=raw,
            published_to_raw_ratio=kafka.published_per_s / raw,
        )
        console.print(
            f"simulator publishes at {figures['published_to_raw_ratio']:.2f}x the raw produce rate"
        )
    finally:
        if broker is not None:
            broker.stop()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    return figures
