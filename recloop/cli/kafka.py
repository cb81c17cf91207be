"""``recloop kafka up|down|status`` and ``recloop topics create``.

``kafka up`` runs a real single-node Apache Kafka (KRaft) on 127.0.0.1 from Maven Central jars,
detached from the command; ``kafka down`` stops only the broker ``up`` started.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from recloop.cli.preflight import require_broker
from recloop.core.settings import Settings
from recloop.ops import broker as local

kafka_app = typer.Typer(
    help="A local Apache Kafka broker (no Docker needed).", no_args_is_help=True
)
topics_app = typer.Typer(help="recloop's Kafka topics.", no_args_is_help=True)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(kafka_app, name="kafka")
    app.add_typer(topics_app, name="topics")


@kafka_app.command("up")
def up(
    port: int = typer.Option(
        local.DEFAULT_PORT, min=1, max=65535, help="Loopback port for clients (PLAINTEXT)."
    ),
) -> None:
    """Start the local broker in the background and wait until it accepts connections.

    Fetches Apache Kafka's jars with Maven the first time (cached under ~/.cache/recloop).

    Example: recloop kafka up --port 9092
    """
    console = Console()
    home = Settings().home
    state, alive, _ = local.broker_status(home)
    if state is not None and alive and state.port == port:
        console.print(f"already running on {state.bootstrap} (pid {state.pid})")
        return
    if not (state is not None and alive) and local.port_open(port):
        console.print(
            f"[red]something else already listens on 127.0.0.1:{port}[/red]; "
            "choose another with --port"
        )
        raise typer.Exit(1)
    libs = local.ensure_kafka_libs()
    if libs.fetched_now:
        console.print(f"fetched Kafka {local.KAFKA_VERSION} jars in {libs.fetch_seconds:.1f} s")
    try:
        state = local.start_detached(port=port, home=home)
    except local.BrokerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"Kafka {state.version} ready on [bold]{state.bootstrap}[/bold] in "
        f"{state.ready_seconds:.1f} s (pid {state.pid}); logs in {state.work_dir}/logs"
    )


@kafka_app.command("down")
def down() -> None:
    """Stop the broker that 'recloop kafka up' started (and nothing else).

    Example: recloop kafka down
    """
    state = local.stop_detached(Settings().home)
    if state is None:
        Console().print("no broker started by 'recloop kafka up' is recorded")
        return
    Console().print(f"stopped the broker on {state.bootstrap} (pid {state.pid})")


@kafka_app.command("status")
def status() -> None:
    """Say whether the broker 'recloop kafka up' started is running and answering.

    Exits 1 when it is not running.

    Example: recloop kafka status
    """
    console = Console()
    state, alive, answering = local.broker_status(Settings().home)
    if state is None or not alive:
        console.print("not running")
        raise typer.Exit(1)
    health = "accepting connections" if answering else "[yellow]not answering[/yellow]"
    console.print(
        f"Kafka {state.version} on {state.bootstrap}, pid {state.pid}, {health}; "
        f"data and logs in {state.work_dir}"
    )


@topics_app.command("create")
def create(
    bootstrap: str = typer.Option(None, help="Kafka bootstrap (default: RECLOOP_KAFKA_BOOTSTRAP)"),
    partitions: int = typer.Option(None, min=1, help="Partitions of per-user topics."),
    prefix: str = typer.Option(None, help="Topic name prefix (default: RECLOOP_TOPIC_PREFIX)."),
) -> None:
    """Create every topic of the topic table, and a .dlq topic for each; existing ones are kept.

    Example: recloop topics create --partitions 4
    """
    from recloop.kafka.admin import TopicError, create_topics, planned_topics

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "kafka_bootstrap": bootstrap,
            "partitions": partitions,
            "topic_prefix": prefix,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    require_broker(settings, "create topics")
    console = Console()
    try:
        result = create_topics(settings)
    except TopicError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    except Exception as exc:  # a broker that does not answer surfaces as a KafkaException
        console.print(f"[red]cannot create topics at {settings.kafka_bootstrap}: {exc}[/red]")
        raise typer.Exit(1) from None
    for topic in planned_topics(settings):
        mark = "created" if topic.name in result.created else "exists"
        policy = "compact" if topic.compacted else "delete"
        console.print(f"{mark:8} {topic.name:40} partitions={topic.partitions} {policy}")
