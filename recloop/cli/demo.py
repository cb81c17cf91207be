"""``recloop demo``: the main job, run against a local Kafka broker.

For now it starts the local broker unless one answers at the bootstrap address, creates the
topics, and round-trips one of each event through Kafka, printing what came back. Later
issues grow it into the full loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from recloop.core import events, topics
from recloop.core.events import Record
from recloop.core.settings import Settings


def example_events(ts: float = 1_700_000_000.0) -> list[Record]:
    """One plausible record of every type in ``recloop.core.events.ALL_RECORD_TYPES``."""
    view = events.UserView(
        observation=[0.25, -1.0], history=[7, 3], history_rewards=[1.5, 0.0], step=2,
        cumulative_reward=1.5,
    )  # fmt: skip
    pending = events.PendingSlate(
        request_id="r-2", step=1, items=[3, 9], propensities=[0.5, 0.25], policy="reinforce",
        policy_version=4, candidates=[3, 9, 11], candidate_features=[[0.1], [0.2], [0.3]],
        served_ts=ts, impressed_positions=[0],
    )  # fmt: skip
    uid, sid = "u-1", "s-1"
    return [
        events.RecRequest(
            request_id="r-1", step=0, ts=ts, k=2, observation=[0.25, -1.0],
            candidates=[3, 9, 11], candidate_features=[[0.1], [0.2], [0.3]], user_id=uid,
            session_id=sid,
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
            propensities=[0.7, 0.3], policy="reinforce", policy_version=4, chosen_item=9,
            chosen_position=0, reward=3.25, next_state=view, done=True, served_ts=ts,
            outcome_ts=ts + 0.03, user_id=uid, session_id=sid,
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
    """The partition key the topic table names for ``record``'s topic."""
    spec = topics.spec(topic_for(type(record)))
    return str(getattr(record, spec.key))


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


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "demo",
        help=(
            "Run the whole loop for a few minutes: a local Kafka broker (started if none "
            "answers), fresh topics, and sim, streams, learn and serve as separate processes, "
            "with a live view; then write the report (HTML + PNG learning curves).\n\n"
            "Examples: recloop demo | recloop demo --duration 600 --algo slateq | "
            "recloop demo --roundtrip (only round-trip one of each event)"
        ),
    )(demo)


def demo(
    duration: float = typer.Option(240.0, min=10.0, help="Seconds to run the loop."),
    algo: str = typer.Option("slateq", help="Algorithm that learns (see `recloop learn`)."),
    users: int = typer.Option(48, min=1, help="Concurrent simulated users."),
    rate: float = typer.Option(80.0, min=1.0, help="Most requests per second from the sim."),
    learned_share: float = typer.Option(
        0.5, min=0.0, max=1.0, help="Share of users served by the learner; the rest get random."
    ),
    out: Path = typer.Option(Path("artifacts/demo"), help="Where logs, snapshots and the report go."),
    external: bool = typer.Option(
        False, help="Only watch and report: the processes run elsewhere (docker compose)."
    ),
    roundtrip: bool = typer.Option(False, help="Only round-trip one of each event and exit."),
    bootstrap: str = typer.Option(
        None, help="Kafka bootstrap (default: RECLOOP_KAFKA_BOOTSTRAP or 127.0.0.1:9092)"
    ),
) -> None:
    from rich.console import Console

    console = Console()
    settings = Settings(kafka_bootstrap=bootstrap) if bootstrap else Settings()
    host, _, port_s = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    try:
        port = int(port_s)
    except ValueError:
        raise typer.BadParameter(
            f"bootstrap {settings.kafka_bootstrap!r} is not host:port", param_hint="--bootstrap"
        ) from None
    if roundtrip:
        _roundtrip(console, settings, host, port)
        return
    from recloop.learner import registry
    from recloop.ops.demo import DemoError, DemoOptions, run_demo

    if algo not in registry.names():
        raise typer.BadParameter(
            f"unknown algorithm {algo!r}; known: {', '.join(registry.names())}", param_hint="--algo"
        )
    options = DemoOptions(
        duration_s=duration, algo=algo, users=users, rate=rate, learned_share=learned_share, out_dir=out,
        external=external,
    )  # fmt: skip
    try:
        summary = run_demo(settings, options, console)
    except DemoError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print_json(data=summary)
    console.print(f"[green]report:[/] {summary['report']}")


def _roundtrip(console: Any, settings: Settings, host: str, port: int) -> None:
    from rich.table import Table

    from recloop.kafka.admin import TopicError, create_topics

    _ensure_broker(console, settings, host, port)
    try:
        result = create_topics(settings)
    except TopicError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"topics: {len(result.created)} created, {len(result.existing)} already there")

    sent = example_events(time.time())
    got = round_trip(settings, sent)
    table = Table(title=f"round trip through Kafka at {settings.kafka_bootstrap}")
    for col in ("type", "topic", "partition", "offset", "record (as read back)"):
        table.add_column(col)
    for c in got:
        name = type(c.value).__name__
        table.add_row(name, c.topic, str(c.partition), str(c.offset), _short(c.value))
    console.print(table)
    if len(got) != len(sent):
        back = {type(c.value) for c in got}
        missing = ", ".join(type(r).__name__ for r in sent if type(r) not in back)
        console.print(f"[red]round trip failed: {missing} did not come back equal[/red]")
        raise typer.Exit(1)
    console.print(f"[green]all {len(sent)} event types came back equal[/green]")


def _ensure_broker(console: Any, settings: Settings, host: str, port: int) -> None:
    """Use the broker at host:port if one answers, else start the local one there."""
    from recloop.ops.broker import BrokerError, port_open, start_detached

    if port_open(port, host or "127.0.0.1"):
        console.print(f"using the Kafka broker that answers at {host}:{port}")
        return
    if host not in ("127.0.0.1", "localhost", ""):
        raise typer.BadParameter(f"no Kafka broker answers at {host}:{port}")
    console.print(f"starting a local Kafka broker on 127.0.0.1:{port} ...")
    try:
        state = start_detached(port, settings.home)
    except BrokerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"broker ready in {state.ready_seconds:.1f} s (pid {state.pid}); "
        "stop it with 'recloop kafka down'"
    )


def _short(record: Record, width: int = 70) -> str:
    from recloop.core import codec

    text = codec.encode(record).decode()
    return text if len(text) <= width else text[: width - 3] + "..."
