"""Fail fast, in words, when a command cannot reach Kafka.

Without this a process against an unreachable broker waits while librdkafka prints
connection errors that name neither the setting nor the fix.
"""

from __future__ import annotations

import typer
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from rich.console import Console

from recloop.core.settings import Settings


def broker_problem(settings: Settings, timeout: float = 5.0) -> str | None:
    """``None`` if the broker at the bootstrap address answers, else Kafka's reason."""
    # log_level 0: the probe's own failure is reported by the caller, once.
    admin = AdminClient({**settings.kafka_client_config(), "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        return kafka_reason(exc)
    return None


def kafka_reason(exc: KafkaException) -> str:
    """Kafka's own words for a failure: confluent-kafka raises with a ``KafkaError``."""
    error = exc.args[0] if exc.args else None
    return error.str() if isinstance(error, KafkaError) else str(exc)


def unreachable_message(settings: Settings, doing: str, reason: str) -> str:
    return (
        f"[red]cannot {doing}: no Kafka broker answers at {settings.kafka_bootstrap}[/] "
        f"({reason}).\nSet RECLOOP_KAFKA_BOOTSTRAP to your broker, or start the local one "
        "with 'recloop kafka up'."
    )


def require_broker(settings: Settings, doing: str) -> None:
    """Exit with status 2 and a message naming the setting and the fix if Kafka is away."""
    reason = broker_problem(settings)
    if reason is not None:
        # stderr, so a script reading JSON on stdout never parses the error as data.
        Console(stderr=True, highlight=False).print(
            unreachable_message(settings, doing, reason), soft_wrap=True
        )
        raise typer.Exit(2)
