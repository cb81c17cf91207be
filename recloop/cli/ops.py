"""Operating commands: ``recloop lag`` and ``recloop report``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

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


def _lag_rows(settings: Settings, groups: list[str]) -> list[dict]:
    from recloop.kafka.lag import committed_topics, group_lag

    rows = []
    for group in groups:
        for lag in group_lag(settings, group, committed_topics(settings, group)):
            rows.append(asdict(lag))
    return rows


def _lag_table(rows: list[dict]) -> Table:
    table = Table(title="consumer-group lag")
    for col in ("group", "topic", "partition", "committed", "log end", "lag", "lag s"):
        table.add_column(col, justify="right")
    totals: dict[str, tuple[int, float]] = {}
    for r in rows:
        seconds = "-" if r["lag_seconds"] is None else f"{r['lag_seconds']:.1f}"
        committed = "-" if r["committed"] is None else str(r["committed"])
        table.add_row(
            r["group"],
            r["topic"],
            str(r["partition"]),
            committed,
            str(r["log_end"]),
            str(r["lag"]),
            seconds,
        )
        msgs, secs = totals.get(r["group"], (0, 0.0))
        totals[r["group"]] = (msgs + r["lag"], max(secs, r["lag_seconds"] or 0.0))
    for group, (msgs, secs) in totals.items():
        table.add_row(f"[bold]{group}[/]", "total", "", "", "", f"[bold]{msgs}[/]", f"{secs:.1f}")
    return table


def lag(
    group: list[str] = typer.Option([], "--group", help="Group(s) to show; default: recloop's."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead."),
    watch: float = typer.Option(0.0, min=0.0, help="Refresh every this many seconds (0: once)."),
) -> None:
    from confluent_kafka import KafkaException

    from recloop.kafka.lag import recloop_groups

    settings = Settings()
    console = Console()
    try:
        while True:
            require_broker(settings, "read consumer-group lag")
            groups = group or recloop_groups(settings)
            rows = _lag_rows(settings, groups)
            if as_json:
                print(json.dumps({"ts": time.time(), "partitions": rows}))
            else:
                if watch:
                    console.clear()
                console.print(_lag_table(rows) if rows else "no recloop consumer groups found")
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
