"""``recloop serve`` (the serving consumer) and ``recloop bench serve`` (its latency)."""

from __future__ import annotations

import json
import logging
import signal
from typing import Annotated

import typer

from recloop.cli.preflight import require_broker
from recloop.core.settings import Settings


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "serve",
        help=(
            "Answer rec.requests with slates on rec.slates, hot-swapping the snapshots "
            "announced on policy.snapshots. Items and their features come from the catalogue "
            "on the items + catalogue topics (it waits RECLOOP_CATALOGUE_WAIT_S for one); "
            "network sizes from each snapshot's manifest.\n\n"
            "Example: recloop serve --policy slateq=0.5 --policy random=0.5 --epsilon 0.05"
        ),
    )(serve)
    bench.command(
        "serve",
        help=(
            "Request-to-slate latency through Kafka at a fixed rate over a catalogue "
            "published on Kafka (large_catalogue's, 100k and 1M by default), next to "
            "compute-only, raw faiss and raw Kafka echo times, slate bytes and the index's "
            "recall against exact search; "
            "median of three runs; ends with one JSON line.\n\n"
            "Example: recloop bench serve --rate 100 --duration 20 --items 100000"
        ),
    )(bench_serve)


def serve(
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            help="NAME[=SHARE], repeatable: policies served side by side, split by user hash. "
            "'random'/'uniform' and 'popularity' are built-in control arms; any other name "
            "serves that policy's snapshots. Default: slateq.",
        ),
    ] = None,
    fallback: str = typer.Option(
        "uniform", help="What a policy serves before its first snapshot: uniform | popularity."
    ),
    epsilon: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Probability of a uniform random slate (exploration)."
    ),
    retrieve: int = typer.Option(
        100, min=1, help="Candidates retrieved by faiss when a request names none."
    ),
    index: str = typer.Option("auto", help="faiss index kind: auto | flat | hnsw | ivf."),
    batch_size: int = typer.Option(256, min=1, help="Most requests answered per batch."),
    seed: int = typer.Option(0, help="Seed of fallback and exploration draws."),
    duration: float = typer.Option(0.0, min=0.0, help="Stop after this many seconds (0: never)."),
) -> None:
    """Run the serving consumer until SIGTERM/SIGINT (or --duration)."""
    from rich.console import Console

    from recloop.metrics import serve_metrics
    from recloop.services.serve import NoCatalogue, ServeOptions, ServeService
    from recloop.services.serve_wiring import learner_loader
    from recloop.serving.fallback import FALLBACK_NAMES
    from recloop.serving.retrieval import INDEX_KINDS
    from recloop.serving.server import ServeConfig
    from recloop.serving.split import TrafficSplit

    try:
        split = TrafficSplit.parse(policy or ["slateq"])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from None
    if fallback not in FALLBACK_NAMES:
        raise typer.BadParameter(
            f"{fallback!r}; choose one of {', '.join(FALLBACK_NAMES)}", param_hint="--fallback"
        )
    if index not in INDEX_KINDS:
        raise typer.BadParameter(f"{index!r}; choose one of {INDEX_KINDS}", param_hint="--index")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(message)s")
    config = ServeConfig(split=split, fallback=fallback, epsilon=epsilon, retrieve_m=retrieve,
                         seed=seed)  # fmt: skip
    settings = Settings()
    require_broker(settings, "serve rec.requests")
    serve_metrics(settings)
    service = ServeService(
        settings,
        config,
        learner_loader(),
        options=ServeOptions(batch_size=batch_size, index_kind=index),
    )
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    console = Console(stderr=True)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in split.fractions().items())
    console.print(f"serving {shares}; fallback {fallback}; epsilon {epsilon}")
    try:
        service.run(
            max_seconds=duration or None,
            on_tick=lambda stats: print(json.dumps(stats, sort_keys=True), flush=True),
        )
    except NoCatalogue as exc:
        typer.echo(str(exc), err=True)  # one line: what is missing and what to start
        raise typer.Exit(1) from None
    print(json.dumps(service.snapshot_stats(), sort_keys=True), flush=True)


def bench_serve(
    rate: float = typer.Option(100.0, min=1.0, help="Requests per second sent to rec.requests."),
    duration: float = typer.Option(20.0, min=1.0, help="Seconds of each measured phase."),
    runs: int = typer.Option(3, min=1, help="Measured phases; figures are their median."),
    items: Annotated[
        list[int] | None,
        typer.Option("--items", min=100, help="Catalogue size, repeatable. Default: 100k and 1M."),
    ] = None,
    sweep: Annotated[
        list[float] | None,
        typer.Option("--sweep", min=1.0, help="A further rate, one phase each; repeatable."),
    ] = None,
    dim: int = typer.Option(32, min=2, help="Feature dimension of the catalogue."),
    slate_size: int = typer.Option(5, min=1, help="Items per slate."),
    retrieve: int = typer.Option(100, min=1, help="Candidates retrieved by faiss per request."),
    index: str = typer.Option("auto", help="faiss index kind: auto | flat | hnsw | ivf."),
    catalogue: str = typer.Option(
        "world", help="world: large_catalogue's clustered items and users; random: unit vectors."
    ),
    bootstrap: str = typer.Option(
        "", help="Kafka bootstrap; default: a private local broker the bench starts and stops."
    ),
) -> None:
    """Measure serving latency through Kafka; one summary line per size, the last line JSON."""
    from recloop.bench.serve import CATALOGUES, SIZES, BenchConfig, run_sizes
    from recloop.serving.retrieval import INDEX_KINDS

    if index not in INDEX_KINDS:
        raise typer.BadParameter(f"{index!r}; choose one of {INDEX_KINDS}", param_hint="--index")
    if catalogue not in CATALOGUES:
        raise typer.BadParameter(f"{catalogue!r}; choose one of {CATALOGUES}",
                                 param_hint="--catalogue")  # fmt: skip

    config = BenchConfig(
        rate=rate, duration_s=duration, runs=runs, dim=dim, k=slate_size, m=retrieve,
        bootstrap=bootstrap, index_kind=index, sweep=tuple(sweep or ()), catalogue=catalogue,
    )  # fmt: skip

    def summary(size: dict) -> None:
        recall = size[f"recall_at_{retrieve}"]
        typer.echo(
            f"{size['n_items']:>9,} items ({size['index']['kind']}): e2e p50 "
            f"{size['e2e_p50_ms']} ms p99 {size['e2e_p99_ms']} ms at {rate:g} req/s; compute "
            f"p50 {size['compute_p50_ms']} ms; faiss p50 {size['faiss_p50_ms']} ms; "
            f"recall@{retrieve} {recall}; slate {size['slate_bytes_mean']:.0f} B; raw Kafka "
            f"echo p50 {size['echo_p50_ms']} ms p99 {size['echo_p99_ms']} ms (e2e/echo p99 "
            f"{size['e2e_over_echo_p99']})",
            err=True,
        )

    figures = run_sizes(config, tuple(items or SIZES), on_size=summary)
    print(json.dumps(figures, sort_keys=True))
