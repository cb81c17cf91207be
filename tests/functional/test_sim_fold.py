"""The runner's sink events fold into exactly one transition per served slate.

In-process loop: producer_sim's events go straight into streams' session fold, as the lead's
in-process learning wiring does. Reward is conserved: transitions carry the episodes' return.
"""

from __future__ import annotations

from recloop.core.events import Click, Impression, SessionEnd, SlateServed
from recloop.producer_sim.policies import RandomPolicy
from recloop.producer_sim.presets import interest_evolution
from recloop.producer_sim.runner import run_episodes
from recloop.streams.fold import apply


def test_runner_events_fold_into_one_transition_per_slate() -> None:
    states, transitions, slates = {}, [], []

    def sink(event) -> None:
        if isinstance(event, SlateServed):
            slates.append(event)
        if isinstance(event, SlateServed | Impression | Click | SessionEnd):
            states[event.user_id], out = apply(states.get(event.user_id), event)
            transitions.extend(out)

    report = run_episodes(interest_evolution(), RandomPolicy(seed=1), 12, seed=0, sink=sink)
    assert sorted(t.request_id for t in transitions) == sorted(s.request_id for s in slates)
    assert sum(t.done for t in transitions) == report.episodes
    assert abs(sum(t.reward for t in transitions) - report.return_E.sum()) < 1e-6
    assert all(t.propensities == [0.3, 0.3, 0.3] for t in transitions)
