"""``recloop catalogue show | export | publish``: the item catalogue on Kafka.

``show`` reads the ``items`` and ``catalogue`` topics like any late-joining process and prints
the newest complete version as one JSON line; ``export DIR`` saves it as a local copy
(``features.safetensors`` + ``manifest.json``); ``publish DIR`` loads such a copy (checked by
its sha256) and publishes it as the next version: how a deployment with its own items (not
the simulator's) puts a catalogue in front of serving and the learner.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from recloop.cli.preflight import require_broker
from recloop.core.settings import Settings

catalogue_app = typer.Typer(help="The item catalogue on Kafka: show, export, publish.",
                            no_args_is_help=True)  # fmt: skip


def register(app: typer.Typer, bench: typer.Typer) -> None:
    del bench
    app.add_typer(catalogue_app, name="catalogue")


def _follow(settings: Settings, wait_s: float):
    from recloop.kafka.bus import KafkaBus
    from recloop.kafka.catalogue import CatalogueFollower, NoCatalogue

    bus = KafkaBus(settings, process="catalogue-cli")
    follower = CatalogueFollower(bus, settings.topics, "cli")
    try:
        catalogue = follower.wait(wait_s)
        follower.poll(timeout=0.5)  # a newer version already on the topics wins
        return follower.current or catalogue
    except NoCatalogue as exc:
        typer.echo(f"recloop catalogue: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        follower.close()


def _summary(catalogue) -> str:
    return json.dumps({"version": catalogue.version, "n_items": catalogue.n_items,
                       "feature_dim": catalogue.feature_dim, "sha256": catalogue.sha256})  # fmt: skip


@catalogue_app.command("show")
def show(wait: float = typer.Option(30.0, min=0.1, help="Seconds to wait for a complete version.")) -> None:
    """Print the newest complete catalogue version as one JSON line."""
    settings = Settings()
    require_broker(settings, "read the catalogue")
    typer.echo(_summary(_follow(settings, wait)))


@catalogue_app.command("export")
def export(
    directory: Path = typer.Argument(..., help="Folder to save features.safetensors + manifest.json in."),
    wait: float = typer.Option(30.0, min=0.1, help="Seconds to wait for a complete version."),
) -> None:
    """Save the newest complete catalogue version as a local copy."""
    from recloop.core.catalogue import save_catalogue

    settings = Settings()
    require_broker(settings, "read the catalogue")
    catalogue = _follow(settings, wait)
    save_catalogue(catalogue, directory)
    typer.echo(_summary(catalogue))


@catalogue_app.command("publish")
def publish(
    directory: Path = typer.Argument(..., help="Folder holding features.safetensors + manifest.json."),
    version: int = typer.Option(
        0, min=0, help="Version to publish as (0: above the newest on the topics and the copy's own)."
    ),
) -> None:
    """Publish a saved catalogue (row i = item i) on the items and catalogue topics."""
    from recloop.core.catalogue import CatalogueRecordError, ItemCatalogue, load_catalogue
    from recloop.kafka.admin import create_topics
    from recloop.kafka.bus import KafkaBus
    from recloop.kafka.catalogue import CatalogueFollower, NoCatalogue, publish_catalogue

    try:
        catalogue = load_catalogue(directory)
    except CatalogueRecordError as exc:
        typer.echo(f"recloop catalogue publish: {exc} (DIRECTORY)", err=True)
        raise typer.Exit(2) from None
    settings = Settings()
    require_broker(settings, "publish the catalogue")
    create_topics(settings)
    bus = KafkaBus(settings, process="catalogue-cli")
    if not version:  # followers ignore a version at or below the one they hold
        follower = CatalogueFollower(bus, settings.topics, "cli")
        try:
            newest = follower.wait(5.0).version
        except NoCatalogue:
            newest = 0
        finally:
            follower.close()
        version = max(newest + 1, catalogue.version)
    catalogue = ItemCatalogue(catalogue.features_NF, version)
    publish_catalogue(bus, settings.topics, catalogue)
    typer.echo(_summary(catalogue))
