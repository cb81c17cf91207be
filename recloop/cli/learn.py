"""``recloop learn``: the online learner service."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import typer

from recloop.cli.preflight import require_broker
from recloop.core.settings import Settings


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "learn",
        help=(
            "Consume rec.transitions, update one algorithm online and publish versioned "
            "snapshots. The item catalogue is read from the items and catalogue topics "
            "(waiting RECLOOP_CATALOGUE_WAIT_S for the first version); the other sizes come "
            "from the first transitions, or from the snapshot it resumes.\n\n"
            "Example: recloop learn --algo slateq --config choice_model=proportional"
        ),
    )(learn)


def learn(
    algo: str = typer.Option("slateq", help="Algorithm name (see learner.registry)."),
    policy: str = typer.Option("", help="Policy name for snapshots; default: the algorithm."),
    history_len: int = typer.Option(5, min=1, help="Recent positive items H a state reads."),
    seed: int = typer.Option(0, help="Seed of the agent."),
    snapshot_every: int = typer.Option(500, min=1, help="Publish after this many transitions."),
    snapshot_seconds: float = typer.Option(10.0, min=0.1, help="...or after this many seconds."),
    duration: float = typer.Option(0.0, min=0.0, help="Stop after this many seconds (0: never)."),
    config: list[str] = typer.Option(
        [], "--config", help="Algorithm Config override KEY=VALUE (JSON value), repeatable."
    ),
) -> None:
    from recloop.learner import registry
    from recloop.metrics import serve_metrics
    from recloop.services.learn import LearnConfig, LearnerService, NoCatalogue
    from recloop.storage.store import Storage

    if algo not in registry.names():
        raise typer.BadParameter(
            f"unknown algorithm {algo!r}; known: {', '.join(registry.names())}", param_hint="--algo"
        )
    overrides = _parse_overrides(config)
    try:
        registry.make_config(algo, **overrides)
    except TypeError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(message)s")
    _limit_torch_threads()
    settings = Settings()
    learn_config = LearnConfig(
        algo=algo,
        policy=policy or algo,
        seed=seed,
        snapshot_every_transitions=snapshot_every,
        snapshot_every_s=snapshot_seconds,
        overrides=overrides,
        history_len=history_len,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    require_broker(settings, "learn from rec.transitions")
    serve_metrics(settings)
    with Storage.from_settings(settings) as storage:
        try:
            service = LearnerService(settings, learn_config, storage=storage, stop=stop.is_set)
        except NoCatalogue as exc:
            typer.echo(f"recloop learn: {exc}", err=True)
            raise typer.Exit(1) from None
        service.run(stop.is_set, max_seconds=duration or None)


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as JSON when it parses, else as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--config")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _limit_torch_threads() -> None:
    """One intra-op thread unless RECLOOP_TORCH_THREADS says otherwise.

    The learner shares the machine with the broker, streams, serving and the simulator;
    torch's default of one spinning thread per core then fights them all (measured: the
    learner fell steadily behind a 60 requests/s loop on 2 cores).
    """
    import os

    import torch

    torch.set_num_threads(int(os.environ.get("RECLOOP_TORCH_THREADS", "1")))
