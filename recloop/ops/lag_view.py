"""``recloop lag``'s view: consumer-group lag per partition, with one total per group.

Rows are ``recloop.kafka.lag``'s figures as plain dicts (what ``--json`` prints); a group's
total is the sum of its partitions' lag in messages and the largest lag in seconds (the
oldest record the group has not committed past, on any partition).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.table import Table

from recloop.core.settings import Settings
from recloop.kafka.lag import committed_topics, group_lag


def lag_rows(settings: Settings, groups: list[str]) -> list[dict[str, Any]]:
    """One row per (group, topic, partition) the groups have committed on."""
    rows = []
    for group in groups:
        for lag in group_lag(settings, group, committed_topics(settings, group)):
            rows.append(asdict(lag))
    return rows


def lag_table(rows: list[dict[str, Any]]) -> Table:
    """The rows as a table, each group followed by its total."""
    table = Table(title="consumer-group lag")
    for col in ("group", "topic", "partition", "committed", "log end", "lag", "lag s"):
        table.add_column(col, justify="right")
    totals: dict[str, tuple[int, float]] = {}
    for r in rows:
        seconds = "-" if r["lag_seconds"] is None else f"{r['lag_seconds']:.1f}"
        committed = "-" if r["committed"] is None else str(r["committed"])
        table.add_row(
            r["group"],
            r["topic"],
            str(r["partition"]),
            committed,
            str(r["log_end"]),
            str(r["lag"]),
            seconds,
        )
        msgs, secs = totals.get(r["group"], (0, 0.0))
        totals[r["group"]] = (msgs + r["lag"], max(secs, r["lag_seconds"] or 0.0))
    for group, (msgs, secs) in totals.items():
        table.add_row(f"[bold]{group}[/]", "total", "", "", "", f"[bold]{msgs}[/]", f"{secs:.1f}")
    return table
