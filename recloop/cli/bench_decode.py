"""``recloop bench decode``: decode cost per record and per kB of every record type."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    del app  # a benchmark only
    bench.command(
        "decode",
        help=(
            "Time codec.decode of a typical record, the largest record the contract accepts "
            "and that record with its floats in msgspec's slowest form, for every record "
            "type: microseconds per record and per kB next to msgspec's untyped decode of the "
            "same bytes in the same run (median of --runs runs), ending with one JSON line.\n\n"
            "Example: recloop bench decode --types RecRequest,SessionState --seconds 0.5"
        ),
    )(bench_decode)


def bench_decode(
    seconds: float = typer.Option(0.2, min=0.0001, help="About how long one run takes."),
    runs: int = typer.Option(3, min=1, help="Runs per figure; the median counts."),
    types: str = typer.Option("", help="Comma-separated record types (default: all)."),
    variants: str = typer.Option(
        "typical,largest,largest-slow-floats", help="Comma-separated variants to measure."
    ),
) -> None:
    from recloop.bench.decode import VARIANTS, DecodeBenchConfig, run
    from recloop.core import events

    names = tuple(t.strip() for t in types.split(",") if t.strip())
    known = [t.__name__ for t in events.ALL_RECORD_TYPES]
    unknown = [t for t in names if t not in known]
    if unknown:
        raise typer.BadParameter(f"unknown record type(s) {unknown}; known: {', '.join(known)}",
                                 param_hint="--types")  # fmt: skip
    chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
    if not chosen or any(v not in VARIANTS for v in chosen):
        raise typer.BadParameter(f"variants are {', '.join(VARIANTS)}", param_hint="--variants")
    run(DecodeBenchConfig(seconds=seconds, runs=runs, types=names, variants=chosen),
        echo=typer.echo)  # fmt: skip
