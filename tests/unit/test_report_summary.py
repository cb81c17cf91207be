"""Confidence intervals of an arm's mean return, pooled from the monitor's windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recloop.core.events import EpisodeOutcome
from recloop.ops.monitor import ArmWindow
from recloop.ops.report import summarise
from recloop.storage.store import Outcome

T0 = datetime(2026, 1, 1, tzinfo=UTC)

returns = st.lists(st.floats(0.0, 400.0), min_size=1, max_size=12)


def _window(values: list[float], minute: int) -> Outcome:
    """What the monitor records for one window of episodes with these returns."""
    arm = ArmWindow()
    for r in values:
        arm.add(EpisodeOutcome(user_id="u", session_id="s", ts=0.0, total_return=r, steps=4,
                               clicks=2, clicked_quality_sum=0.0))  # fmt: skip
    return Outcome(
        "slateq", 1, T0 + timedelta(minutes=minute), T0 + timedelta(minutes=minute + 1),
        arm.episodes, arm.mean_return, 0.5, 0.0, arm.steps, return_sd=arm.return_sd,
    )  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(windows=st.lists(returns, min_size=1, max_size=8))
def test_pooled_windows_give_the_interval_of_all_sessions_at_once(windows) -> None:
    everything = np.array([r for w in windows for r in w])
    [arm] = summarise([_window(w, i) for i, w in enumerate(windows)])
    assert arm.episodes == len(everything)
    assert np.isclose(arm.mean_return, everything.mean())
    if len(everything) < 2:
        assert arm.return_ci95 is None
    else:
        direct = 1.96 * everything.std(ddof=1) / np.sqrt(len(everything))
        assert np.isclose(arm.return_ci95, direct, rtol=1e-6, atol=1e-6)


def test_no_interval_when_a_window_recorded_no_spread() -> None:
    old = Outcome("slateq", 1, T0, T0 + timedelta(minutes=1), 10, 170.0, 0.5, 0.0, 40)
    [arm] = summarise([old, _window([150.0, 190.0], 2)])
    assert arm.return_ci95 is None and arm.episodes == 12
