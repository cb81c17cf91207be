"""The live view's arithmetic: episodes attributed to the version that served most slates."""

from __future__ import annotations

from recloop.core.events import EpisodeOutcome
from recloop.ops.monitor import ArmWindow, _by_stage, majority_arm


def outcome(policy_steps: dict[str, int], ret: float = 100.0) -> EpisodeOutcome:
    return EpisodeOutcome(
        user_id="u", session_id="s", ts=0.0, total_return=ret, steps=sum(policy_steps.values()),
        clicks=1, policy_steps=policy_steps,
    )


def test_majority_arm_picks_the_version_that_served_most_slates() -> None:
    assert majority_arm(outcome({"slateq:0": 3, "slateq:2": 5, "slateq:3": 1})) == ("slateq", 2)
    assert majority_arm(outcome({"random:0": 4})) == ("random", 0)
    assert majority_arm(outcome({})) == ("unknown", 0)


def test_totals_split_into_fallback_and_learned_versions() -> None:
    totals: dict[str, ArmWindow] = {}
    for key, ret in (("slateq:0", 150.0), ("slateq:1", 170.0), ("slateq:4", 190.0),
                     ("random:0", 160.0)):
        window = totals.setdefault(key, ArmWindow())
        window.add(outcome({key: 10}, ret))
    stages = _by_stage(totals)
    learned, low, high = stages[("slateq", True)]
    assert (learned.episodes, low, high) == (2, 1, 4)
    assert learned.return_sum / learned.episodes == 180.0
    fallback, low, high = stages[("slateq", False)]
    assert (fallback.episodes, fallback.return_sum, low, high) == (1, 150.0, 0, 0)
    assert stages[("random", False)][0].episodes == 1
