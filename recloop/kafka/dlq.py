"""``DeadLetterConsumer``: the decoding, dead-lettering ``Reader`` on a Kafka bus.

The rules (decode as the topic table says, dead-letter to ``<topic>.dlq`` with the headers
of ``recloop.core.dlq``, flush and confirm dead letters before committing past them) are
written once, over the ``Bus``, in ``recloop.kafka.deadletter``; this module only wires them
to confluent-kafka for tools that read one or two topics with ``Settings`` in hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, Producer

from recloop.core.settings import Settings
from recloop.kafka.bus import KafkaBus, KafkaConsumer
from recloop.kafka.deadletter import Consumed, PollStats, Reader, dead_letter

__all__ = ["Consumed", "DeadLetterConsumer", "PollStats", "dead_letter"]


class DeadLetterConsumer(Reader):
    """A ``Reader`` over a ``KafkaBus`` made from ``settings`` (see ``Reader`` for the rules)."""

    def __init__(
        self,
        settings: Settings,
        base_topics: Sequence[str],
        group_id: str,
        name: str,
        *,
        value_types: Mapping[str, Any] | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        producer: Producer | None = None,
    ) -> None:
        super().__init__(
            KafkaBus(settings, producer=producer), settings.topics, base_topics, group_id, name,
            value_types=value_types, tuning=consumer_config,
        )  # fmt: skip

    @property
    def kafka(self) -> Consumer:
        """The wrapped confluent-kafka consumer, for assignment queries, lag and seeks."""
        consumer = self.consumer
        assert isinstance(consumer, KafkaConsumer)
        return consumer.consumer
