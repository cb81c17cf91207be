"""What ``recloop sim`` simulates and when it stops, and the counts of one run."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from recloop.core.events import EpisodeOutcome


@dataclass(frozen=True)
class SimConfig:
    """What to simulate and when to stop (0 means no limit)."""

    preset: str = "interest_evolution"
    """World preset (see producer_sim.presets)."""
    preset_options: dict = field(default_factory=dict)
    """Options for the preset builder, e.g. {"slate_size": 3}."""
    users: int = 100
    """Concurrent simulated users."""
    seed: int = 0
    """Seeds the catalogue and the users' behaviour."""
    rate: float = 0.0
    """Most requests per second (0: as fast as slates come back)."""
    max_events: int = 0
    """Stop once this many events (requests, feedback, outcomes) are published; the last
    batch of answers is published whole, so the count may pass the limit by one batch."""
    max_sessions: int = 0
    """Start no more than this many sessions and stop when they have all ended."""
    duration_s: float = 0.0
    """Stop after this many seconds of being served, counted from the first slate (a large
    catalogue's publication and serving's index build come before it)."""
    startup_timeout_s: float = 1800.0
    """With ``duration_s``: stop anyway if no slate came within this many seconds."""
    slate_timeout_s: float = 5.0
    """Resend a request that got no slate within this many seconds (0: never)."""
    run_tag: str = ""
    """Prefix of user ids; default: sim<seed>-<random hex>, unique per run."""
    keep_outcomes: bool = False
    """Keep every EpisodeOutcome in ``stats.kept_outcomes`` (the in-process report reads them)."""


@dataclass
class SimStats:
    """Running counts of one simulator run."""

    started_s: float = field(default_factory=time.monotonic)
    requests: int = 0
    retries: int = 0
    slates: int = 0
    invalid_slates: int = 0
    undecodable_slates: int = 0
    unmatched_slates: int = 0
    feedback: int = 0
    outcomes: int = 0
    clicks: int = 0
    sessions_started: int = 0
    catalogue_versions: int = 0
    """Catalogue versions published after the first (a world that resamples documents)."""
    commit_errors: int = 0
    """Commits that failed for a transient reason (retried at the next one)."""
    last_error: str = ""
    recent_returns: deque = field(default_factory=lambda: deque(maxlen=200))
    returns_by_policy: dict[str, list[float]] = field(default_factory=dict)
    kept_outcomes: list[EpisodeOutcome] = field(default_factory=list)

    @property
    def published(self) -> int:
        return self.requests + self.retries + self.feedback + self.outcomes

    first_slate_s: float | None = None
    """When the first slate was read (``time.monotonic``); None before."""

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_s

    @property
    def served_s(self) -> float:
        """Seconds since the first slate (0 before it)."""
        return 0.0 if self.first_slate_s is None else time.monotonic() - self.first_slate_s

    @property
    def ctr(self) -> float:
        return self.clicks / self.slates if self.slates else 0.0

    def record_outcome(self, outcome: EpisodeOutcome, keep: bool = False) -> None:
        self.outcomes += 1
        if keep:
            self.kept_outcomes.append(outcome)
        self.recent_returns.append(outcome.total_return)
        # Attribute the session to the policy version that served most of its slates.
        if outcome.policy_steps:
            key = max(outcome.policy_steps, key=outcome.policy_steps.__getitem__)
            self.returns_by_policy.setdefault(key, []).append(outcome.total_return)
