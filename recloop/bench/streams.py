"""``recloop bench streams``: events per second through the faust worker, next to a raw loop.

One run, one broker, one backlog of synthetic users' slates and feedback (produced before
the clock starts; ``streams.synthetic``: slates of 3 items offered from 10 candidate ids, as
an interest-evolution simulator sends them, ids only since schema v2), consumed twice:

- **faust**: a streams worker, a separate process exactly as ``recloop streams`` runs it,
  drains the backlog; the rate is the events divided by the time from its first transition
  on ``rec.transitions`` to its last (every expected transition must arrive, exactly);
- **raw**: an aiokafka consumer loop in this process folds the same records with the same
  ``BatchFolder`` (states kept in a dict), sends states and transitions to a second set of
  output topics as the worker does (``streams.sender`` batches, transitions acknowledged
  before their states) and commits after flushing, as faust does; timed from its first
  record to its last flush.

The ratio faust/raw is the price of faust's machinery. Both are also given per CPU-second
of the process doing the work (the worker's, from ``/proc``; the loop's own): on a shared
machine the wall-clock rates move with other load, the CPU cost per event much less. The
last line printed is one JSON object with every figure.

``fold_bench`` (``python -m recloop.bench.streams``) is the fold alone, without a broker:
the same ``BatchFolder`` over the same synthetic backlog's raw records, in causal order and
in topic-grouped fetches (a fetch of slates, then one of feedback, as a backlog is read),
states kept in a dict; events per CPU-second, the median of ``repeats`` runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from recloop.core import codec
from recloop.core.events import Record, Transition
from recloop.core.settings import Settings
from recloop.kafka.admin import create_topics, delete_topics
from recloop.kafka.clients import (
    DeliveryTracker,
    flush_or_raise,
    make_consumer,
    make_producer,
    produce_records,
)
from recloop.streams.app import tune_gc
from recloop.streams.batch import BatchFolder, RawRecord
from recloop.streams.fold import FoldConfig
from recloop.streams.sender import BatchSender, send_transitions_then_states
from recloop.streams.synthetic import SyntheticConfig, causal_events, split_topics


@dataclass(frozen=True)
class BenchConfig:
    """What the streams benchmark runs."""

    users: int = 5000
    """Synthetic users (interleaved at random, as many users' events are)."""
    sessions: int = 2
    """Sessions per user."""
    steps: int = 5
    """Slates per session."""
    batch_size: int = 10_000
    """Records per batch, for both the faust worker and the raw loop."""
    bootstrap: str = ""
    """Kafka bootstrap; empty starts a private local broker for the run."""
    timeout_s: float = 300.0
    """Give up on a phase after this long."""
    seed: int = 0


def fold_bench(cfg: BenchConfig, repeats: int = 3, fetch: int = 3000) -> dict[str, Any]:
    """The fold's own rate over the synthetic backlog, in two orders (module docstring)."""
    events = causal_events(
        SyntheticConfig(users=cfg.users, sessions=cfg.sessions, steps=cfg.steps, seed=cfg.seed)
    )
    slates, feedback = split_topics(events)
    slates_topic, feedback_topic = "slates", "feedback"

    def raw(records: list[Record], topic: Any) -> list[RawRecord]:
        return [RawRecord(topic(r), 0, i, r.user_id.encode(), codec.encode(r))  # type: ignore[attr-defined]
                for i, r in enumerate(records)]  # fmt: skip

    slate_ids = {id(s) for s in slates}
    causal = raw(events, lambda r: slates_topic if id(r) in slate_ids else feedback_topic)
    raw_slates = raw(slates, lambda _: slates_topic)
    raw_feedback = raw(feedback, lambda _: feedback_topic)
    grouped: list[RawRecord] = []
    for i in range(0, max(len(raw_slates), len(raw_feedback)), fetch):
        grouped += raw_slates[i : i + fetch] + raw_feedback[i : i + fetch]
    figures: dict[str, Any] = {"bench": "streams-fold", "events": len(events)}
    for name, records in (("causal", causal), ("topic_grouped", grouped)):
        seconds = sorted(_fold_seconds(records, cfg.batch_size) for _ in range(repeats))
        figures[f"{name}_events_per_cpu_s"] = round(len(records) / seconds[len(seconds) // 2])
        figures[f"{name}_cpu_s"] = [round(x, 3) for x in seconds]
    return figures


def _fold_seconds(records: list[RawRecord], batch_size: int) -> float:
    folder = BatchFolder("slates", "feedback", FoldConfig())
    states: dict[bytes, Any] = {}
    start = time.process_time()
    for i in range(0, len(records), batch_size):
        result = folder.fold(records[i : i + batch_size], states.get)
        for key, (_, _, state) in result.states.items():
            states[key] = state
    return time.process_time() - start


def produce_backlog(settings: Settings, events: list[Record]) -> None:
    slates, feedback = split_topics(events)
    producer = make_producer(settings, {"linger.ms": 50, "batch.size": 1_000_000})
    tracker = DeliveryTracker()
    produce_records(producer, settings.topics.slates, slates, lambda r: r.user_id, tracker)
    produce_records(producer, settings.topics.feedback, feedback, lambda r: r.user_id, tracker)
    flush_or_raise(producer, tracker, timeout=120)


def run_faust(settings: Settings, cfg: BenchConfig, want: int, work: Path) -> dict[str, Any]:
    """Run one worker process over the backlog; time first to last transition."""
    env = {
        **os.environ,
        "RECLOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "RECLOOP_TOPIC_PREFIX": settings.topic_prefix,
        "RECLOOP_PARTITIONS": str(settings.partitions),
        "RECLOOP_METRICS_PORT": "0",  # never the port a running demo's worker holds
    }
    cmd = [
        sys.executable, "-m", "recloop", "streams", "--no-create",  # _measure made them
        "--app-id", f"{settings.topic_prefix}streams", "--data-dir", str(work / "faust"),
        "--batch-size", str(cfg.batch_size), "--session-timeout", "1e12",
    ]  # fmt: skip
    log = open(work / "worker.log", "wb")  # noqa: SIM115 - handed to the process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    consumer = make_consumer(settings, f"{settings.topic_prefix}bench-reader")
    consumer.subscribe([settings.topics.transitions])
    ids: set[str] = set()
    copies = 0
    first = last = 0.0
    cpu_first = cpu_last = None
    deadline = time.monotonic() + cfg.timeout_s
    try:
        while len(ids) < want and time.monotonic() < deadline and proc.poll() is None:
            got = 0
            for msg in consumer.consume(2000, 0.2):
                if msg.error() is not None:
                    continue
                now = time.monotonic()
                first = first or now
                last = now
                copies += 1
                got += 1
                ids.add(codec.decode(msg.value(), Transition).transition_id)
            if got:
                cpu_last = process_cpu_seconds(proc.pid)
                cpu_first = cpu_first if cpu_first is not None else cpu_last
    finally:
        consumer.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if len(ids) < want:
        tail = (work / "worker.log").read_text()[-3000:]
        raise RuntimeError(f"faust worker produced {len(ids)}/{want} transitions\n{tail}")
    cpu = cpu_last - cpu_first if cpu_first is not None and cpu_last is not None else None
    return {
        "seconds": last - first,
        "cpu_seconds": cpu,
        "transitions": len(ids),
        "duplicates": copies - len(ids),
    }


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux ``/proc``; None elsewhere).

    The machine the benchmark runs on is often shared, so wall-clock rates swing with other
    load; events per CPU-second says what the process itself costs, whatever the load.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _raw_loop(
    settings: Settings, out: Settings, cfg: BenchConfig, total: int
) -> dict[str, Any]:
    """Consume the backlog with aiokafka, fold with BatchFolder, send, flush, commit."""
    topics, out_topics = settings.topics, out.topics
    consumer = AIOKafkaConsumer(
        topics.slates, topics.feedback,
        bootstrap_servers=settings.kafka_bootstrap, group_id=f"{settings.topic_prefix}raw",
        enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=cfg.batch_size,
    )  # fmt: skip
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", max_batch_size=512 * 1024
    )
    states_out, transitions_out = BatchSender(), BatchSender()
    folder = BatchFolder(topics.slates, topics.feedback, FoldConfig())
    states: dict[bytes, Any] = {}
    seen = transitions = 0
    first = 0.0
    cpu_first = 0.0
    await consumer.start()
    await producer.start()
    try:
        deadline = time.monotonic() + cfg.timeout_s
        last_commit = time.monotonic()
        while seen < total and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=cfg.batch_size)
            records = [
                RawRecord(m.topic, m.partition, m.offset, m.key, m.value)
                for msgs in batch.values()
                for m in msgs
            ]
            if not records:
                continue
            if not first:
                first, cpu_first = time.monotonic(), time.process_time()
            result = folder.fold(records, states.get)
            # Sent as the worker sends them: whole batches, transitions acknowledged first.
            for key, partition, t in result.transitions:
                transitions_out.add(out_topics.transitions, partition, key, codec.encode(t))
            for key, (partition, raw, state) in result.states.items():
                states[key] = state
                states_out.add(out_topics.session_state, partition, key, raw)
            await send_transitions_then_states(producer, transitions_out, states_out)
            seen += len(records)
            transitions += len(result.transitions)
            if time.monotonic() - last_commit > 2.8:  # faust's default commit interval
                await producer.flush()
                await consumer.commit()
                last_commit = time.monotonic()
        await producer.flush()
        await consumer.commit()
        elapsed = time.monotonic() - first
        cpu = time.process_time() - cpu_first
    finally:
        await consumer.stop()
        await producer.stop()
    return {"seconds": elapsed, "cpu_seconds": cpu, "records": seen, "transitions": transitions}


def _per_cpu_second(events: int, cpu_seconds: float | None) -> float | None:
    if not cpu_seconds:
        return None
    return round(events / cpu_seconds, 1)


def run_bench(cfg: BenchConfig, echo=print) -> dict[str, Any]:
    """Run both phases and return the figures (also echoed as text and one JSON line)."""
    with tempfile.TemporaryDirectory(prefix="recloop-bench-streams-") as tmp:
        work = Path(tmp)
        broker = None
        bootstrap = cfg.bootstrap
        if not bootstrap:
            from recloop.ops.broker import LocalBroker

            broker = LocalBroker(work / "kafka", die_with_parent=True).start()
            bootstrap = broker.bootstrap
        try:
            return _measure(cfg, bootstrap, work, echo)
        finally:
            if broker is not None:
                broker.stop()


def _measure(cfg: BenchConfig, bootstrap: str, work: Path, echo) -> dict[str, Any]:
    prefix = f"bench-streams-{uuid.uuid4().hex[:8]}."
    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
    raw_out = Settings(kafka_bootstrap=bootstrap, topic_prefix=f"{prefix}raw.")
    create_topics(settings)
    create_topics(raw_out)
    try:
        workload = SyntheticConfig(
            users=cfg.users, sessions=cfg.sessions, steps=cfg.steps, seed=cfg.seed
        )
        events = causal_events(workload)
        slates, feedback = split_topics(events)
        want = workload.users * workload.sessions * workload.steps
        want_records, n_feedback = len(events), len(feedback)
        echo(f"producing {len(events)} events ({n_feedback} feedback) for {cfg.users} users")
        produce_backlog(settings, events)

        faust = run_faust(settings, cfg, want, work)
        faust_rate = want_records / faust["seconds"]
        echo(
            f"faust worker : {faust_rate:9.0f} events/s "
            f"({n_feedback / faust['seconds']:.0f} feedback events/s), "
            f"{faust['transitions']} transitions, {faust['duplicates']} duplicates"
        )
        del events, slates, feedback  # the raw loop should not carry the backlog's objects
        tune_gc()  # the same collector settings the worker runs with
        raw = asyncio.run(_raw_loop(settings, raw_out, cfg, want_records))
        raw_rate = raw["records"] / raw["seconds"]
        echo(f"raw aiokafka : {raw_rate:9.0f} events/s, {raw['transitions']} transitions")
        echo(f"ratio faust/raw: {faust_rate / raw_rate:.2f}")
        faust_cpu_rate = _per_cpu_second(want_records, faust["cpu_seconds"])
        raw_cpu_rate = _per_cpu_second(raw["records"], raw["cpu_seconds"])
        if faust_cpu_rate and raw_cpu_rate:
            echo(
                f"per CPU-second (load-independent): faust {faust_cpu_rate:.0f}, "
                f"raw {raw_cpu_rate:.0f} events"
            )
        figures = {
            "bench": "streams",
            "events": want_records,
            "feedback_events": n_feedback,
            "faust_events_per_s": round(faust_rate, 1),
            "faust_feedback_events_per_s": round(n_feedback / faust["seconds"], 1),
            "raw_events_per_s": round(raw_rate, 1),
            "ratio_faust_to_raw": round(faust_rate / raw_rate, 3),
            "faust_events_per_cpu_s": faust_cpu_rate,
            "raw_events_per_cpu_s": raw_cpu_rate,
            "faust_transitions": faust["transitions"],
            "faust_duplicates": faust["duplicates"],
            "raw_transitions": raw["transitions"],
            "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "config": asdict(cfg),
        }
        echo(json.dumps(figures))
        return figures
    finally:
        for s in (settings, raw_out):
            try:
                delete_topics(s, timeout=10)
            except Exception as exc:  # cleanup must not hide the figures
                echo(f"(could not delete topics {s.topic_prefix}*: {exc})")


if __name__ == "__main__":
    print(json.dumps(fold_bench(BenchConfig())))
