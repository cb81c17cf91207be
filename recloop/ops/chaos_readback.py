"""Reading a chaos run back: topics from the start to the high watermark, groups, snapshots.

Everything here reads and nothing joins a group or commits: ``read_records`` gives every
record of a topic raw (value bytes and headers, so dead letters keep their reasons and a
record that does not decode is evidence too); ``log_ends``, ``behind`` and ``committer``
say how far the topics and a group are; ``newest_valid_manifest`` finds the newest snapshot
whose files verify against storage's record of it.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Message, TopicPartition

from recloop.core import codec
from recloop.core.dlq import parse_headers
from recloop.core.events import Transition
from recloop.core.settings import Settings
from recloop.core.snapshot import SnapshotError, latest_snapshot, read_snapshot, snapshot_dir
from recloop.kafka.clients import make_admin
from recloop.kafka.lag import group_lag
from recloop.kafka.read import read_messages
from recloop.ops.chaos_evidence import TopicRecord
from recloop.storage.store import Storage


def read_records(settings: Settings, topic: str, timeout_s: float = 120.0) -> list[TopicRecord]:
    """Every record of ``topic`` from each partition's start to its high watermark, raw
    (value bytes and headers): dead letters are read for their headers, and a record that
    does not decode is evidence too. Joins no group and commits nothing."""
    return [TopicRecord(p, offset, msg.value(), _headers(msg))
            for p, offset, msg in read_messages(settings, topic, timeout_s)]  # fmt: skip


def _headers(msg: Message) -> dict[str, str]:
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    return parse_headers([(k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs])


def transition_ids(settings: Settings) -> set[str]:
    """The distinct transition ids on ``rec.transitions`` (records that decode)."""
    decode = codec.decoder_for(Transition)
    ids = set()
    for r in read_records(settings, settings.topics.transitions):
        try:
            ids.add(decode(r.value).transition_id)
        except codec.RecordDecodeError:
            continue
    return ids


def log_ends(settings: Settings, topic: str) -> dict[int, int]:
    consumer = Consumer({**settings.kafka_client_config(), "group.id": "recloop-chaos-reader"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions}  # fmt: skip
    finally:
        consumer.close()


def behind(settings: Settings, group: str | None, topics: list[str]) -> tuple[int | None, str]:
    """How many records ``group`` has not committed past on ``topics`` (``None`` before it
    committed at all), and where: each partition behind, with its committed offset."""
    if group is None:
        return None, "(no group has committed yet)"
    lags = [lag for lag in group_lag(settings, group, topics, with_seconds=False) if lag.lag]
    where = ", ".join(f"{lag.topic}[{lag.partition}] {lag.lag} past committed {lag.committed}"
                      for lag in lags)  # fmt: skip
    total = sum(lag.lag for lag in lags)
    return total, f"{total}" + (f" ({where})" if where else "")


def newest_valid_manifest(
    settings: Settings, policy: str
) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest of the newest snapshot of ``policy`` whose files verify (against the hashes
    storage recorded for its version, where it did), and why newer ones were skipped."""
    root = settings.resolved_snapshot_dir
    with Storage.from_settings(settings) as storage:
        recorded = {int(s["version"]): s for s in storage.list_snapshots(policy)}
    try:
        newest = latest_snapshot(root, policy)
    except SnapshotError:
        newest = None  # a damaged newest manifest; storage's versions are tried below
    versions = sorted({*recorded, *([newest.version] if newest else [])}, reverse=True)
    skipped = []
    for version in versions:
        row = recorded.get(version, {})
        try:
            _, manifest = read_snapshot(snapshot_dir(root, policy, version),
                                        row.get("weights_sha256"), row.get("manifest_sha256"))  # fmt: skip
        except SnapshotError as exc:
            skipped.append(f"v{version}: {exc}")
            continue
        return manifest, skipped
    return None, skipped


def committer(settings: Settings, topic: str) -> str | None:
    """The group that commits on ``topic`` (serving's request group, whatever its name)."""
    admin = make_admin(settings)
    for listing in admin.list_consumer_groups(request_timeout=10).result().valid:
        request = [ConsumerGroupTopicPartitions(listing.group_id)]
        offsets = next(iter(admin.list_consumer_group_offsets(request).values())).result()
        if any(tp.topic == topic for tp in offsets.topic_partitions or []):
            return str(listing.group_id)
    return None
