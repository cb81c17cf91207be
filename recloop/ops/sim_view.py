"""``recloop sim``'s live view: traffic, failures, and the ground truth per served version.

Rates are per second of the run so far; returns are the simulator's own ground truth
(``EpisodeOutcome.total_return``), the last 200 sessions overall and per policy version for
the five most recent versions.
"""

from __future__ import annotations

from rich.table import Table

from recloop.services.sim_settings import SimStats


def progress_table(stats: SimStats) -> Table:
    """The live view: traffic, failures, and the ground truth per served policy version."""
    elapsed = max(stats.elapsed_s, 1e-9)
    table = Table(title=f"recloop sim, {elapsed:.0f} s", show_header=False)
    recent = list(stats.recent_returns)
    rows = [
        (
            "requests / slates",
            f"{stats.requests:,} / {stats.slates:,} ({stats.slates / elapsed:,.0f} steps/s)",
        ),
        ("events published", f"{stats.published:,} ({stats.published / elapsed:,.0f}/s)"),
        ("retries (timeouts)", f"{stats.retries:,}"),
        ("dead-lettered slates", f"{stats.invalid_slates + stats.undecodable_slates:,}"),
        ("unmatched slates", f"{stats.unmatched_slates:,}"),
        ("sessions ended", f"{stats.outcomes:,} of {stats.sessions_started:,} started"),
        ("CTR (clicks/slate)", f"{stats.ctr:.3f}"),
        ("mean return (last 200)", f"{sum(recent) / len(recent):.1f}" if recent else "-"),
    ]
    for key, returns in sorted(stats.returns_by_policy.items())[-5:]:
        rows.append(
            (f"return, {key}", f"{sum(returns) / len(returns):.1f} over {len(returns)} sessions")
        )
    for name, value in rows:
        table.add_row(name, value)
    return table
