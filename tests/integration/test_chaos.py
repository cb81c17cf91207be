"""The whole loop under kill -9 of every kind of process and a broker outage loses nothing.

``recloop.ops.chaos`` runs the demo's four processes on a broker of the test's own, kills
them (and the broker) under traffic, drains, and judges the topics: the transitions equal the
offline replay of the fold, the learner's manifest applied each exactly once, every request
was answered, served versions never went backwards. The suite's run takes the defaults
(under three minutes on two cores); a longer one sets the variables of
``recloop.ops.chaos_plan.ENV_OPTIONS``, e.g. ``RECLOOP_CHAOS_KILLS=15``,
``RECLOOP_CHAOS_BROKER_KILLS=2``, ``RECLOOP_CHAOS_SECONDS=360``,
``RECLOOP_CHAOS_BROKER_DOWN_S=30-60``, ``RECLOOP_CHAOS_PAUSE_S=1-4``, ``RECLOOP_CHAOS_SEED``.
The counts are printed as one line and as one JSON line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recloop.ops.chaos import run_chaos
from recloop.ops.chaos_plan import options_from_env

pytestmark = pytest.mark.integration

# Read once, at collection, so the timeout below fits the run the environment asks for.
OPTIONS = options_from_env(os.environ, Path("unused"))


@pytest.mark.timeout(int(OPTIONS.budget_s()))
def test_the_loop_loses_nothing_under_kill_9_and_a_broker_outage(tmp_path: Path) -> None:
    options = options_from_env(os.environ, tmp_path / "chaos")
    result = run_chaos(options, say=lambda line: print(line, flush=True))
    print(result.summary_line())
    print(result.json_line())
    # Each kind was killed at least once and the broker as often as asked: the plan ran.
    assert set(result.counts["kills"]) == {"sim", "streams", "learn", "serve"}
    assert sum(result.counts["kills"].values()) == options.kills
    assert result.counts["broker_kills"] == options.broker_kills
    assert result.verdict.ok, result.report()
