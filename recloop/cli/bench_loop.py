"""``recloop bench loop``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.command(
        "loop",
        help=(
            "Freshness p50/p99 (an event's time to the first slate served by a version that "
            "learned from it) and learner lag of the whole loop at a fixed request rate.\n\n"
            "Example: recloop bench loop --rate 60 --duration 120"
        ),
    )(bench_loop)


def bench_loop(
    rate: float = typer.Option(60.0, min=1.0, help="Requests per second from the simulator."),
    duration: float = typer.Option(120.0, min=10.0, help="Seconds to run the loop."),
    users: int = typer.Option(32, min=1, help="Concurrent simulated users."),
    algo: str = typer.Option("slateq", help="Algorithm that learns."),
    snapshot_seconds: float = typer.Option(5.0, min=0.5, help="Learner snapshot interval."),
    bootstrap: str = typer.Option(None, help="Kafka bootstrap; default: start a local broker."),
) -> None:
    from rich.console import Console

    from recloop.bench.loop import LoopBenchConfig, print_figures, run_loop_bench

    config = LoopBenchConfig(
        rate=rate, duration_s=duration, users=users, algo=algo, snapshot_seconds=snapshot_seconds
    )
    with tempfile.TemporaryDirectory(prefix="recloop-bench-loop-") as work:
        figures = run_loop_bench(config, bootstrap, Path(work))
    print_figures(figures, Console())
