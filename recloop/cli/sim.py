"""``recloop sim`` (simulated users through Kafka) and ``recloop bench sim``."""

from __future__ import annotations

import signal
import threading

import typer
from rich.console import Console
from rich.live import Live

from recloop.cli.preflight import require_broker
from recloop.core.settings import Settings


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "sim",
        help=(
            "Run simulated users against serving through Kafka: each publishes RecRequests, "
            "reacts to the SlateServed answers and publishes impressions, clicks, session ends "
            "and ground-truth outcomes.\n\n"
            "Example: recloop sim --preset interest_evolution --users 200 --duration 60"
        ),
    )(sim)
    bench.command(
        "sim",
        help=(
            "Simulator speed: in-process user-steps/s, events/s through Kafka against a random "
            "responder, and the raw confluent-kafka produce rate for the same message size.\n\n"
            "Example: recloop bench sim --seconds 20"
        ),
    )(bench_sim)


_PRESET_FLAGS = (
    ("slate_size", "--slate-size"),
    ("num_candidates", "--candidates"),
    ("resample_every", "--resample-every"),
    ("resample_count", "--resample-count"),
    ("n_items", "--n-items"),
)
"""The preset options the CLI sets, with their flags."""


def _preset_options(
    preset: str,
    slate_size: int | None,
    candidates: int | None,
    resample_every: int | None = None,
    resample_count: int | None = None,
    n_items: int | None = None,
) -> dict:
    """The options for ``preset``'s builder; a one-line ``BadParameter`` naming the flag for
    an unknown preset, an option its builder does not take, or sizes it refuses."""
    import inspect

    from recloop.producer_sim.presets import PRESETS

    if preset not in PRESETS:
        raise typer.BadParameter(
            f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}", param_hint="--preset"
        )
    builder = PRESETS[preset]
    takes = inspect.signature(builder).parameters
    options: dict = {}
    values = (slate_size, candidates, resample_every, resample_count, n_items)
    for (name, flag), value in zip(_PRESET_FLAGS, values, strict=True):
        if value is None:
            continue
        if name not in takes:
            sets = [f for n, f in _PRESET_FLAGS if n in takes]
            raise typer.BadParameter(
                f"{preset} takes no {flag} (it takes {', '.join(sets) or 'none of these'})",
                param_hint=flag,
            )
        options[name] = value
    try:
        builder(**options)  # validate sizes now, with a clear message
    except ValueError as exc:
        hint = "/".join(f for n, f in _PRESET_FLAGS if n in options) or "--preset"
        raise typer.BadParameter(" ".join(str(exc).split()), param_hint=hint) from None
    return options


def sim(
    preset: str = typer.Option(
        "interest_evolution", help="World preset: interest_evolution, tiny_world, large_catalogue."
    ),
    users: int = typer.Option(100, min=1, help="Concurrent simulated users."),
    rate: float = typer.Option(0.0, min=0.0, help="Most requests per second (0: no limit)."),
    max_events: int = typer.Option(
        0, min=0, help="Stop after publishing this many events (0: no limit)."
    ),
    max_sessions: int = typer.Option(
        0, min=0, help="Stop once this many sessions have ended (0: no limit)."
    ),
    duration: float = typer.Option(
        0.0, min=0.0,
        help="Stop after this many seconds of being served, from the first slate (0: no limit).",
    ),
    seed: int = typer.Option(0, help="Seed of the catalogue and of the users."),
    slate_size: int = typer.Option(None, min=1, help="Slate size K (default: the preset's)."),
    candidates: int = typer.Option(
        None, min=1, help="Candidates per request (presets that offer a candidate list)."
    ),
    resample_every: int = typer.Option(
        None,
        min=0,
        help="Replace --resample-count documents every this many user-steps, "
        "each new catalogue version published before it is requested (interest_evolution).",
    ),
    resample_count: int = typer.Option(None, min=1, help="Documents each resample replaces."),
    n_items: int = typer.Option(
        None, min=1, help="Items in the catalogue (default: the preset's; large_catalogue: 1,000,000 works)."
    ),
    slate_timeout: float = typer.Option(
        5.0, min=0.1, help="Resend a request unanswered this long (s)."
    ),
    bootstrap: str = typer.Option(None, help="Kafka bootstrap (default: RECLOOP_KAFKA_BOOTSTRAP)."),
) -> None:
    from recloop.metrics import serve_metrics
    from recloop.ops.sim_view import progress_table
    from recloop.services.sim import SimConfig, SimService

    options = _preset_options(
        preset, slate_size, candidates, resample_every, resample_count, n_items
    )
    settings = Settings(kafka_bootstrap=bootstrap) if bootstrap else Settings()
    config = SimConfig(
        preset=preset,
        preset_options=options,
        users=users,
        seed=seed,
        rate=rate,
        max_events=max_events,
        max_sessions=max_sessions,
        duration_s=duration,
        slate_timeout_s=slate_timeout,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    console = Console()
    require_broker(settings, "run simulated users")
    try:
        serve_metrics(settings)
        service = SimService(settings, config)
    except Exception as exc:  # a broker that does not answer surfaces as a KafkaException
        console.print(f"[red]cannot reach Kafka at {settings.kafka_bootstrap}: {exc}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"simulating {users} users of {preset} (run {service.cohort.run_tag}) via {settings.kafka_bootstrap}"
    )
    with Live(console=console, refresh_per_second=4) as live:
        stats = service.run(stop.is_set, on_progress=lambda s: live.update(progress_table(s)))
    console.print(
        f"\ndone: {stats.outcomes} sessions, {stats.published} events published, {stats.retries} retries"
    )


def bench_sim(
    bootstrap: str = typer.Option(
        None, help="Kafka bootstrap; default: start a local broker for the run."
    ),
    preset: str = typer.Option("interest_evolution", help="World preset."),
    users: int = typer.Option(2000, min=1, help="Concurrent simulated users in the Kafka run."),
    seconds: float = typer.Option(15.0, min=1.0, help="Length of the Kafka run."),
) -> None:
    from recloop.bench.sim import run_bench

    _preset_options(preset, None, None)
    run_bench(bootstrap, preset, users, seconds, Console())
