"""Create (and, for tests, delete) recloop's topics from the topic table in ``recloop.core.topics``.

Per-user topics get ``settings.partitions`` partitions so that faust's co-partitioning holds;
the one topic not keyed by user (policy snapshots) gets a single partition, which keeps every
snapshot announcement in one ordered log. Every topic gets a ``<topic>.dlq`` sibling for the
records its consumers cannot decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from recloop.core.settings import Settings
from recloop.kafka.clients import make_admin

DLQ_PARTITIONS = 1


class TopicError(RuntimeError):
    """A topic could not be created, or exists with a layout recloop cannot use."""


@dataclass(frozen=True)
class PlannedTopic:
    """One topic to create: its resolved name and layout."""

    name: str
    partitions: int
    compacted: bool
    is_dlq: bool


def planned_topics(settings: Settings) -> list[PlannedTopic]:
    """Every topic of the table, resolved for ``settings``, each followed by its DLQ."""
    topics = settings.topics
    plan: list[PlannedTopic] = []
    for name, spec in topics.all():
        partitions = settings.partitions if spec.per_user else 1
        plan.append(PlannedTopic(name, partitions, spec.compacted, is_dlq=False))
        plan.append(PlannedTopic(topics.dlq(name), DLQ_PARTITIONS, False, is_dlq=True))
    return plan


@dataclass(frozen=True)
class CreateResult:
    created: list[str]
    existing: list[str]


def create_topics(settings: Settings, timeout: float = 30.0) -> CreateResult:
    """Create every planned topic; existing ones are fine if their partition count matches.

    A per-user topic with another partition count breaks co-partitioning, so that is an error
    rather than something to paper over.
    """
    admin = make_admin(settings)
    plan = planned_topics(settings)
    new = [
        NewTopic(
            t.name,
            num_partitions=t.partitions,
            replication_factor=settings.replication_factor,
            config={"cleanup.policy": "compact"} if t.compacted else {},
        )
        for t in plan
    ]
    futures = admin.create_topics(new, request_timeout=timeout, operation_timeout=timeout)
    created, existing = [], []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"could not create topic {name!r}: {exc.args[0].str()}") from exc
            existing.append(name)
    if existing:
        _check_partitions(admin, [t for t in plan if t.name in existing], timeout)
    return CreateResult(sorted(created), sorted(existing))


def _check_partitions(admin: AdminClient, plan: list[PlannedTopic], timeout: float) -> None:
    metadata = admin.list_topics(timeout=timeout)
    for t in plan:
        meta = metadata.topics.get(t.name)
        if meta is None or t.is_dlq:
            continue
        if len(meta.partitions) != t.partitions:
            raise TopicError(
                f"topic {t.name!r} exists with {len(meta.partitions)} partitions, but settings "
                f"ask for {t.partitions}; per-user topics must share one partition count"
            )


def delete_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Delete every planned topic that exists (tests use it to keep the broker small)."""
    admin = make_admin(settings)
    present = set(admin.list_topics(timeout=timeout).topics)
    names = [t.name for t in planned_topics(settings) if t.name in present]
    if not names:
        return []
    for fut in admin.delete_topics(names, request_timeout=timeout).values():
        fut.result()
    return names
