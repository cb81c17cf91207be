"""Consumer-group lag as Kafka itself reports it: log-end offset minus committed offset.

Reads the group's committed offsets with a consumer that never joins the group (no
subscribe), so measuring never disturbs the members. Seconds of lag are the age of the
oldest record the group has not yet committed past (read with one short fetch), which is
what an operator means by "how far behind".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition

from recloop.core.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group has not committed on this partition
    log_end: int
    lag: int
    lag_seconds: float | None


def group_lag(
    settings: Settings, group: str, topics: list[str], with_seconds: bool = True
) -> list[PartitionLag]:
    """Lag of ``group`` on every partition of ``topics``."""
    conf = {
        **settings.kafka_client_config(),
        "group.id": group,
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    }
    consumer = Consumer(conf)
    try:
        partitions: list[TopicPartition] = []
        metadata = consumer.list_topics(timeout=10)
        for topic in topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                continue
            partitions += [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        committed = consumer.committed(partitions, timeout=10) if partitions else []
        out = []
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            has_commit = tp.offset not in (OFFSET_INVALID,) and tp.offset >= 0
            position = tp.offset if has_commit else low
            lag = max(0, high - position)
            seconds = None
            if with_seconds:
                seconds = _oldest_age(consumer, tp.topic, tp.partition, position) if lag else 0.0
            out.append(
                PartitionLag(
                    group,
                    tp.topic,
                    tp.partition,
                    tp.offset if has_commit else None,
                    high,
                    lag,
                    seconds,
                )
            )
        return out
    finally:
        consumer.close()


def recloop_groups(settings: Settings) -> list[str]:
    """Consumer groups of this deployment's processes (streams, learner, serving): under its
    topic prefix, so another deployment's groups on the same broker are not shown."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())
    result = admin.list_consumer_groups(request_timeout=10).result()
    names = sorted(g.group_id for g in result.valid)
    wanted = tuple(settings.topics.group(w) for w in ("recloop-streams", "recloop-learner",
                                                      "recloop-serve"))  # fmt: skip
    return [n for n in names if n.startswith(wanted) and "-side-" not in n]


def committed_topics(settings: Settings, group: str) -> list[str]:
    """Topics on which ``group`` has committed offsets."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = next(iter(futures.values())).result()
    return sorted({tp.topic for tp in result.topic_partitions})


def _oldest_age(consumer: Consumer, topic: str, partition: int, offset: int) -> float | None:
    """Seconds since the record at ``offset`` was written (None if it cannot be read)."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            _, ts_ms = msg.timestamp()
            return max(0.0, time.time() - ts_ms / 1000.0)
        return None
    finally:
        consumer.unassign()


def total(lags: list[PartitionLag]) -> tuple[int, float | None]:
    """Total messages behind and the worst partition's seconds behind."""
    seconds = [lag.lag_seconds for lag in lags if lag.lag_seconds is not None]
    return sum(lag.lag for lag in lags), (max(seconds) if seconds else None)
