"""The ``recloop`` command line: one typer app with a sub-command module per concern.

Each module in ``_COMMAND_MODULES`` exposes ``register(app, bench)``: it adds its commands
to the top-level ``app`` and, if it has a benchmark, to the ``recloop bench`` group.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="recloop",
    help="Streaming, online-learning RL recommender on Kafka.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
bench = typer.Typer(
    help="Benchmarks that print figures next to a raw baseline from the same run.",
    no_args_is_help=True,
)
app.add_typer(bench, name="bench")

_COMMAND_MODULES = [
    "recloop.cli.kafka",
    "recloop.cli.demo",
    "recloop.cli.chaos",
    "recloop.cli.learn",
    "recloop.cli.db",
    "recloop.cli.sim",
    "recloop.cli.ops",
    "recloop.cli.serve",
    "recloop.cli.learn_bench",
    "recloop.cli.streams",
    "recloop.cli.bench_loop",
    "recloop.cli.bench_decode",
    "recloop.cli.catalogue",
]


_registered = False


def _register() -> None:
    """Add every module's commands (once: tests and ``main`` may both ask)."""
    global _registered
    if _registered:
        return
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(app, bench)
    _registered = True


def main() -> None:
    _register()
    app()
