"""Kafka's own consumer-group command, as users check lag: the reference ``recloop lag`` is
compared against in the tests.

``describe_group`` runs ``ConsumerGroupCommand --describe`` from the local broker's jars;
``parse_group_describe`` reads the table it prints (``-`` where a value is unknown).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from recloop.ops.broker.jars import QUICK_JIT, BrokerError, classpath, ensure_kafka_libs, java


@dataclass(frozen=True)
class GroupOffsetRow:
    """One row of ``kafka-consumer-groups --describe``; ``None`` where it prints '-'."""

    group: str
    topic: str
    partition: int
    current_offset: int | None
    log_end_offset: int | None
    lag: int | None
    consumer_id: str | None
    host: str | None
    client_id: str | None


def parse_group_describe(output: str) -> list[GroupOffsetRow]:
    """Parse the table ConsumerGroupCommand prints (GROUP TOPIC PARTITION ... CLIENT-ID)."""
    rows: list[GroupOffsetRow] = []
    header: list[str] | None = None
    for line in output.splitlines():
        cols = line.split()
        if not cols:
            continue
        if cols[0] == "GROUP" and "PARTITION" in cols:
            header = cols
            continue
        if header is None or len(cols) < 6:
            continue
        rec = dict(zip(header, cols, strict=False))

        def num(name: str, rec: dict[str, str] = rec) -> int | None:
            value = rec.get(name, "-")
            return None if value == "-" else int(value)

        def text(name: str, rec: dict[str, str] = rec) -> str | None:
            value = rec.get(name, "-")
            return None if value == "-" else value

        rows.append(
            GroupOffsetRow(
                group=rec["GROUP"],
                topic=rec["TOPIC"],
                partition=int(rec["PARTITION"]),
                current_offset=num("CURRENT-OFFSET"),
                log_end_offset=num("LOG-END-OFFSET"),
                lag=num("LAG"),
                consumer_id=text("CONSUMER-ID"),
                host=text("HOST"),
                client_id=text("CLIENT-ID"),
            )
        )
    return rows


def describe_group(
    bootstrap: str, group: str, cache_dir: Path | None = None, timeout: float = 60.0
) -> list[GroupOffsetRow]:
    """Run Kafka's own ConsumerGroupCommand for ``group`` and return its lag table."""
    libs = ensure_kafka_libs(cache_dir).libs_dir
    cmd = [
        java(), "-Xmx256m", QUICK_JIT, "-Dlog4j2.level=WARN", "-cp", classpath(libs),
        "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        "--bootstrap-server", bootstrap, "--describe", "--group", group,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BrokerError(f"ConsumerGroupCommand failed for group {group!r}:\n{proc.stderr}")
    return parse_group_describe(proc.stdout)
