"""``recloop bench learn``: per-algorithm learning table and update throughput."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    del app  # a benchmark only
    bench.command(
        "learn",
        help=(
            "Train each algorithm in process (once per training seed), evaluate it against "
            "random, popularity and the myopic oracle on the same users (return, clicked "
            "quality, CTR with 95% CIs; paired differences), measure update throughput "
            "against a bare torch loop, and end with one JSON line.\n\n"
            "Example: recloop bench learn --algos slateq,slateq_myopic --train-episodes 100\n\n"
            "Whole catalogue: recloop bench learn --world large_catalogue --train-seeds 3 "
            "(--n-items 1000000 for the 1M variant)"
        ),
    )(learn_bench)


def learn_bench(
    world: str = typer.Option("interest_evolution", help="producer_sim preset."),
    n_items: int = typer.Option(0, min=0, help="Catalogue size (0: the preset's own)."),
    algos: str = typer.Option("", help="Comma-separated algorithm names (default: all)."),
    train_episodes: int = typer.Option(100, min=1, help="Training sessions per algorithm."),
    eval_episodes: int = typer.Option(200, min=2, help="Evaluation sessions per policy."),
    seed: int = typer.Option(0, help="Seed of worlds, agents and evaluation."),
    train_seeds: int = typer.Option(1, min=1, help="Training seeds per algorithm."),
    throughput_seconds: float = typer.Option(
        3.0, min=0.0, help="Time per throughput measure (0: none)."
    ),
    as_served: bool = typer.Option(
        True, help="No candidate list: evaluate learned policies behind serving's retrieval "
        "(top 100 of the catalogue); --no-as-served ranks the whole catalogue with the policy."
    ),
) -> None:
    import inspect

    from recloop.bench.learn import BenchConfig, run
    from recloop.learner import registry
    from recloop.producer_sim.presets import PRESETS

    if world not in PRESETS:
        raise typer.BadParameter(f"unknown world {world!r}; known: {', '.join(sorted(PRESETS))}",
                                 param_hint="--world")
    if n_items and "n_items" not in inspect.signature(PRESETS[world]).parameters:
        raise typer.BadParameter(f"{world} has a fixed catalogue", param_hint="--n-items")
    names = tuple(a.strip() for a in algos.split(",") if a.strip())
    unknown = [a for a in names if a not in registry.names()]
    if unknown:
        raise typer.BadParameter(
            f"unknown algorithm(s) {unknown}; known: {', '.join(registry.names())}",
            param_hint="--algos")
    run(BenchConfig(world=world, n_items=n_items, algorithms=names, train_episodes=train_episodes,
                    eval_episodes=eval_episodes, seed=seed, train_seeds=train_seeds,
                    throughput_seconds=throughput_seconds, as_served=as_served), echo=typer.echo)
