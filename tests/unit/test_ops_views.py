"""The tables of ``recloop lag`` and ``recloop sim``: totals and ground truth, as printed."""

from __future__ import annotations

from rich.console import Console

from recloop.ops.lag_view import lag_table
from recloop.ops.sim_view import progress_table
from recloop.services.sim_settings import SimStats


def _text(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def _row(text: str, first: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.strip("│ ").startswith(first)]
    return [cell.strip() for cell in line.strip("│").split("│")]


def test_a_groups_total_sums_its_messages_and_keeps_its_oldest_lag():
    rows = [
        {"group": "g", "topic": "t", "partition": 0, "committed": 4, "log_end": 10, "lag": 6,
         "lag_seconds": 2.5},
        {"group": "g", "topic": "t", "partition": 1, "committed": None, "log_end": 3, "lag": 3,
         "lag_seconds": 7.0},
        {"group": "h", "topic": "t", "partition": 0, "committed": 5, "log_end": 5, "lag": 0,
         "lag_seconds": None},
    ]  # fmt: skip
    text = _text(lag_table(rows))
    totals = [ln for ln in text.splitlines() if "total" in ln]
    assert len(totals) == 2
    g = [c.strip() for c in totals[0].strip("│").split("│")]
    assert g[0] == "g" and g[5:] == ["9", "7.0"]
    h = [c.strip() for c in totals[1].strip("│").split("│")]
    assert h[0] == "h" and h[5:] == ["0", "0.0"]
    cells = [[c.strip() for c in ln.strip("│").split("│")] for ln in text.splitlines()]
    (uncommitted,) = [c for c in cells if c[:3] == ["g", "t", "1"]]
    assert uncommitted[3:] == ["-", "3", "3", "7.0"]  # no commit yet: shown as '-'


def test_the_sim_view_shows_ctr_and_the_return_of_each_served_version():
    stats = SimStats(slates=8, clicks=2, requests=8, outcomes=3, sessions_started=4)
    stats.recent_returns.extend([1.0, 2.0, 6.0])
    stats.returns_by_policy = {"slateq:3": [2.0, 4.0], "random:0": [1.0]}
    text = _text(progress_table(stats))
    assert _row(text, "CTR (clicks/slate)")[1] == "0.250"
    assert _row(text, "mean return (last 200)")[1] == "3.0"
    assert _row(text, "return, slateq:3")[1] == "3.0 over 2 sessions"
    assert _row(text, "return, random:0")[1] == "1.0 over 1 sessions"
    assert _row(text, "sessions ended")[1] == "3 of 4 started"
