"""``recloop streams`` (the session-state worker) and ``recloop bench streams``."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.core.settings import Settings


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "streams",
        help=(
            "Fold rec.slates and rec.feedback into per-user session state (faust), emitting "
            "rec.transitions and the compacted session.state. Start several with the same "
            "--app-id to split the partitions.\n\n"
            "Example: recloop streams --app-id recloop-streams --session-timeout 600"
        ),
    )(streams)
    bench.command(
        "streams",
        help=(
            "Events per second through one faust worker and, in the same run, a raw aiokafka "
            "loop applying the same fold; ends with one JSON line.\n\n"
            "Example: recloop bench streams --users 5000"
        ),
    )(bench_streams)


def streams(
    app_id: str = typer.Option(
        "", help="faust app id (consumer group); default: the topic prefix + recloop-streams."
    ),
    data_dir: str = typer.Option("", help="faust data dir (default: HOME/streams/APP_ID)."),
    batch_size: int = typer.Option(10_000, min=1, help="Most records folded per batch."),
    batch_within: float = typer.Option(0.05, min=0.001, help="Longest wait to fill a batch (s)."),
    session_timeout: float = typer.Option(
        1800.0, min=0.001, help="End a session idle this long (s)."
    ),
    expiry_interval: float = typer.Option(
        10.0, min=0.1, help="How often idle sessions are swept (s)."
    ),
    create: bool = typer.Option(True, help="Create missing topics first."),
    loglevel: str = typer.Option("WARNING", help="Log level of the worker."),
) -> None:
    from recloop.cli.preflight import require_broker
    from recloop.kafka.admin import create_topics
    from recloop.metrics import serve_metrics
    from recloop.streams.app import StreamsConfig
    from recloop.streams.worker import run

    if loglevel.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise typer.BadParameter(f"unknown log level {loglevel!r}", param_hint="--loglevel")
    settings = Settings()
    require_broker(settings, "run the streams worker")
    if create:
        create_topics(settings)
    app_id = app_id or default_app_id(settings)
    config = StreamsConfig(
        app_id=app_id,
        data_dir=Path(data_dir) if data_dir else settings.home / "streams" / app_id,
        batch_size=batch_size,
        batch_within_s=batch_within,
        session_timeout_s=session_timeout,
        expiry_interval_s=expiry_interval,
    )
    config.data_dir.mkdir(parents=True, exist_ok=True)  # faust makes only the last level
    serve_metrics(settings)
    run(settings, config, loglevel, observer=_metrics_observer(settings))


def default_app_id(settings: Settings) -> str:
    """The worker's faust app id (its consumer group): under the deployment's prefix."""
    return settings.topics.group("recloop-streams")


def _metrics_observer(settings: Settings):
    """Count each folded batch into the Prometheus metrics of recloop.metrics."""
    from collections import Counter

    from recloop import metrics
    from recloop.streams.fold import overflow_cap

    topics = settings.topics
    out_transitions = metrics.RECORDS_OUT.labels("streams", topics.transitions)
    out_states = metrics.RECORDS_OUT.labels("streams", topics.session_state)

    def observe(records, result) -> None:
        for topic, n in Counter(r.topic for r in records).items():
            metrics.RECORDS_IN.labels("streams", topic).inc(n)
        for record, reason in result.rejects:
            metrics.DLQ.labels("streams", record.topic).inc()
            if (cap := overflow_cap(reason)) is not None:
                metrics.FOLD_OVERFLOW.labels(cap).inc()
            else:
                metrics.DECODE_ERRORS.labels("streams", record.topic).inc()
        out_transitions.inc(len(result.transitions))
        out_states.inc(len(result.states))

    return observe


def bench_streams(
    users: int = typer.Option(5000, min=1, help="Synthetic users."),
    sessions: int = typer.Option(2, min=1, help="Sessions per user."),
    steps: int = typer.Option(5, min=1, help="Slates per session."),
    batch_size: int = typer.Option(10_000, min=1, help="Records per batch."),
    bootstrap: str = typer.Option("", help="Kafka bootstrap; empty starts a private broker."),
    timeout: float = typer.Option(300.0, min=1.0, help="Give up on a phase after this long (s)."),
) -> None:
    from recloop.bench.streams import BenchConfig, run_bench

    run_bench(
        BenchConfig(
            users=users,
            sessions=sessions,
            steps=steps,
            batch_size=batch_size,
            bootstrap=bootstrap,
            timeout_s=timeout,
        )  # fmt: skip
    )
