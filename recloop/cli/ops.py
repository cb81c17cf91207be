"""Operating commands: ``recloop lag`` (view in ``recloop.ops.lag_view``) and ``recloop report``
(built by ``recloop.ops.report``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console

from recloop.cli.preflight import kafka_reason, require_broker, unreachable_message
from recloop.core.settings import Settings


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "lag",
        help=(
            "Consumer-group lag of streams, learner and serving, per partition and in total "
            "(messages and seconds), as Kafka's own kafka-consumer-groups.sh computes it.\n\n"
            "Examples: recloop lag | recloop lag --json | recloop lag --group "
            "recloop-learner-slateq --watch 2"
        ),
    )(lag)
    app.command(
        "report",
        help=(
            "Write an HTML page and PNG plots (learning curves per policy and version, lag, "
            "freshness, A/B comparison) for a run, from storage.\n\n"
            "Example: recloop report --out artifacts/report   (latest run)"
        ),
    )(report)


def lag(
    group: list[str] = typer.Option([], "--group", help="Group(s) to show; default: recloop's."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead."),
    watch: float = typer.Option(0.0, min=0.0, help="Refresh every this many seconds (0: once)."),
) -> None:
    from confluent_kafka import KafkaException

    from recloop.kafka.lag import recloop_groups
    from recloop.ops.lag_view import lag_rows, lag_table

    settings = Settings()
    console = Console()
    try:
        while True:
            require_broker(settings, "read consumer-group lag")
            groups = group or recloop_groups(settings)
            rows = lag_rows(settings, groups)
            if as_json:
                print(json.dumps({"ts": time.time(), "partitions": rows}))
            else:
                if watch:
                    console.clear()
                console.print(lag_table(rows) if rows else "no recloop consumer groups found")
            if not watch:
                return
            time.sleep(watch)
    except KafkaException as exc:
        reason = kafka_reason(exc)
        # stderr, so a script reading --json on stdout never parses the error as data.
        Console(stderr=True, highlight=False).print(
            unreachable_message(settings, "read consumer-group lag", reason), soft_wrap=True
        )
        raise typer.Exit(2) from None


def report(
    run: str = typer.Option("", help="Run id (see storage); default: the latest run."),
    out: Path = typer.Option(Path("artifacts/report"), help="Directory for index.html and PNGs."),
) -> None:
    from recloop.ops.report import build_report
    from recloop.storage.store import Storage

    settings = Settings()
    with Storage.from_settings(settings) as storage:
        run_id = run or storage.latest_run_id()
        if not run_id:
            raise typer.BadParameter(
                f"no runs recorded in {settings.resolved_database_url}; run 'recloop demo' first",
                param_hint="--run",
            )
        page = build_report(storage, run_id, out)
    Console().print(f"report written: {page}")
