"""``recloop demo``: the whole loop on one machine, watched, with a report at the end.

A thin shell: it reads the options, checks them, and hands them to ``recloop.ops.demo``,
which starts the local broker unless one answers, creates a fresh set of topics, runs sim,
streams, learn and serve as separate processes with a live view, and writes the report.
"""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.core.settings import Settings


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "demo",
        help=(
            "Run the whole loop for a few minutes: a local Kafka broker (started if none "
            "answers), fresh topics, and sim, streams, learn and serve as separate processes, "
            "with a live view; then write the report (HTML + PNG learning curves).\n\n"
            "Examples: recloop demo | recloop demo --duration 600 --algo slateq | "
            "recloop demo --preset large_catalogue --n-items 1000000 --algo mf | "
            "recloop demo --external (only watch and report: docker compose runs the processes)"
        ),
    )(demo)


def demo(
    duration: float = typer.Option(240.0, min=10.0, help="Seconds to run the loop."),
    algo: str = typer.Option("slateq", help="Algorithm that learns (see `recloop learn`)."),
    preset: str = typer.Option(
        "interest_evolution", help="The simulator's world (it publishes the catalogue)."
    ),
    n_items: int = typer.Option(0, min=0, help="Catalogue size (0: the preset's own)."),
    users: int = typer.Option(48, min=1, help="Concurrent simulated users."),
    rate: float = typer.Option(80.0, min=1.0, help="Most requests per second from the sim."),
    learned_share: float = typer.Option(
        0.5, min=0.0, max=1.0, help="Share of users served by the learner; the rest get random."
    ),
    out: Path = typer.Option(Path("artifacts/demo"), help="Where logs, snapshots and the report go."),
    external: bool = typer.Option(
        False, help="Only watch and report: the processes run elsewhere (docker compose)."
    ),
    bootstrap: str = typer.Option(
        None, help="Kafka bootstrap (default: RECLOOP_KAFKA_BOOTSTRAP or 127.0.0.1:9092)"
    ),
) -> None:
    from rich.console import Console

    from recloop.learner import registry
    from recloop.ops.demo import DemoError, DemoOptions, run_demo

    console = Console()
    settings = Settings(kafka_bootstrap=bootstrap) if bootstrap else Settings()
    _, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    if not port.isdigit():
        raise typer.BadParameter(
            f"bootstrap {settings.kafka_bootstrap!r} is not host:port", param_hint="--bootstrap"
        )
    if algo not in registry.names():
        raise typer.BadParameter(
            f"unknown algorithm {algo!r}; known: {', '.join(registry.names())}", param_hint="--algo"
        )
    from recloop.producer_sim.presets import PRESETS

    if preset not in PRESETS:
        raise typer.BadParameter(
            f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}", param_hint="--preset"
        )
    options = DemoOptions(
        duration_s=duration, algo=algo, users=users, rate=rate, learned_share=learned_share, out_dir=out,
        external=external, preset=preset, n_items=n_items,
    )  # fmt: skip
    try:
        summary = run_demo(settings, options, console)
    except DemoError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print_json(data=summary)
    console.print(f"[green]report:[/] {summary['report']}")
