"""``recloop chaos``: the whole loop under kill -9 and a broker outage, judged from its topics.

A thin shell: it reads the options (each also from its ``RECLOOP_CHAOS_*`` variable, as the
suite's chaos test does), checks them, and hands them to ``recloop.ops.chaos``, which starts
a broker of its own and the four processes, kills them under traffic, drains, and checks
that nothing was lost, nothing applied twice, every request answered and no version served
backwards. Exit code 1 when a check fails.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "chaos",
        help=(
            "Run the whole loop on a private broker, kill -9 every kind of process (and the "
            "broker) under traffic, drain, and check the topics: transitions equal the fold's "
            "replay, the learner applied each once, every request was answered, no version "
            "went backwards. Ends with one summary line and one JSON line.\n\n"
            "Example: recloop chaos --kills 15 --broker-kills 2 --seconds 400"
        ),
    )(chaos)


def chaos(
    seconds: float = typer.Option(
        110.0, min=1.0, envvar="RECLOOP_CHAOS_SECONDS", help="Seconds of faults under traffic."
    ),
    kills: int = typer.Option(
        5, min=4, envvar="RECLOOP_CHAOS_KILLS", help="Process kills (one of each kind at least)."
    ),
    broker_kills: int = typer.Option(
        1, min=0, envvar="RECLOOP_CHAOS_BROKER_KILLS", help="Broker kills."
    ),
    broker_down: str = typer.Option(
        "10-20",
        envvar="RECLOOP_CHAOS_BROKER_DOWN_S",
        help="Seconds a killed broker stays dead: N or LOW-HIGH.",
    ),
    pause: str = typer.Option(
        "1-4", envvar="RECLOOP_CHAOS_PAUSE_S", help="Seconds a killed process stays dead."
    ),
    seed: int = typer.Option(0, envvar="RECLOOP_CHAOS_SEED", help="Seed of the fault plan."),
    rate: float = typer.Option(
        25.0, min=1.0, envvar="RECLOOP_CHAOS_RATE", help="Most requests per second from the sim."
    ),
    out: Path = typer.Option(
        Path("artifacts/chaos"), help="Where each run's folder (broker, logs, snapshots) goes."
    ),
) -> None:
    from recloop.ops.chaos import run_chaos
    from recloop.ops.chaos_plan import ChaosOptions

    down, paused = _seconds(broker_down, "--broker-down"), _seconds(pause, "--pause")
    options = ChaosOptions(
        work_dir=out / time.strftime("%Y%m%d-%H%M%S"), seconds=seconds, kills=kills,
        broker_kills=broker_kills, broker_down_s=down, restart_pause_s=paused, seed=seed,
        rate=rate,
    )  # fmt: skip
    result = run_chaos(options)
    print(result.report())
    print(result.json_line())
    if not result.verdict.ok:
        raise typer.Exit(1)


def _seconds(text: str, option: str) -> tuple[float, float]:
    from recloop.ops.chaos_plan import seconds_range

    try:
        return seconds_range(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not N or LOW-HIGH", param_hint=option) from None
