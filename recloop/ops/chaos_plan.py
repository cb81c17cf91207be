"""What a chaos run does: its options (also from ``RECLOOP_CHAOS_*``) and its fault plan.

``plan_faults`` draws every fault of a run from ``options.seed`` alone: each kind of
process is killed at least once and the rest of the kills go to kinds drawn at random, the
broker is killed ``broker_kills`` times, and the faults are spread over ``seconds`` in a
shuffled order, each with how long its target stays dead. The same options give the same
plan, so a failing run can be repeated.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("sim", "streams", "learn", "serve")
BROKER = "broker"


@dataclass(frozen=True)
class ChaosOptions:
    """What a chaos run does and how long it may take."""

    work_dir: Path = Path("artifacts/chaos")
    seconds: float = 110.0
    """How long faults go on, under traffic."""
    kills: int = 5
    """kill -9 of a process: every kind once, the rest of a kind drawn from the seed."""
    broker_kills: int = 1
    broker_down_s: tuple[float, float] = (10.0, 20.0)
    """How long the broker stays dead, drawn from this range."""
    restart_pause_s: tuple[float, float] = (1.0, 4.0)
    """How long a killed process stays dead, drawn from this range."""
    seed: int = 0
    users: int = 16
    rate: float = 25.0
    """Requests per second from the sim: modest, so two cores keep up with the whole loop;
    with ``users`` each user sends about as often as in the demo, so an outage leaves each
    a backlog of a few dozen records."""
    algo: str = "slateq"
    learn_args: tuple[str, ...] = (
        "--config", "choice_model=proportional", "--config", "update_every=8",
    )  # fmt: skip
    """SlateQ knows interest_evolution's proportional choice model; one update of 64 per 8
    new transitions keeps the learner ahead of the stream."""
    preset: str = "interest_evolution"
    learned_share: float = 0.5
    snapshot_every: int = 200
    snapshot_seconds: float = 3.0
    warmup_timeout_s: float = 150.0
    """Longest wait for the loop's first snapshot before any fault."""
    drain_timeout_s: float = 150.0
    """Longest wait, after the sim stopped, for the rest to finish what is on the topics."""
    recovery_timeout_s: float = 90.0
    """Longest wait, after a restart, for the loop to move again (a longer one fails)."""

    def __post_init__(self) -> None:
        if self.kills < len(KINDS):
            raise ValueError(f"kills must be at least {len(KINDS)} (one of each kind: {KINDS})")
        if self.broker_kills < 0 or self.seconds <= 0:
            raise ValueError("broker_kills must be >= 0 and seconds > 0")

    def budget_s(self) -> float:
        """The longest a run may take: start-up, faults (broker outages may overrun their
        slot), drain, stops and reading back, with a margin."""
        faults = self.kills * (self.restart_pause_s[1] + self.recovery_timeout_s)
        outages = self.broker_kills * (self.broker_down_s[1] + 60 + self.recovery_timeout_s)
        start = 60 + self.warmup_timeout_s
        return start + self.seconds + faults + outages + self.drain_timeout_s + 150


def seconds_range(text: str) -> tuple[float, float]:
    """``"10-20"`` -> ``(10.0, 20.0)``; ``"50"`` -> ``(50.0, 50.0)``."""
    low, _, high = text.partition("-")
    return float(low), float(high or low)


ENV_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "RECLOOP_CHAOS_SECONDS": ("seconds", float),
    "RECLOOP_CHAOS_KILLS": ("kills", int),
    "RECLOOP_CHAOS_BROKER_KILLS": ("broker_kills", int),
    "RECLOOP_CHAOS_SEED": ("seed", int),
    "RECLOOP_CHAOS_RATE": ("rate", float),
    "RECLOOP_CHAOS_BROKER_DOWN_S": ("broker_down_s", seconds_range),
    "RECLOOP_CHAOS_PAUSE_S": ("restart_pause_s", seconds_range),
}
"""The environment variables a longer run sets (the suite's run takes the defaults)."""


def options_from_env(env: Mapping[str, str], work_dir: Path) -> ChaosOptions:
    """``ChaosOptions`` with what ``ENV_OPTIONS`` names in ``env``; a bad value raises a
    ``ValueError`` that names its variable."""
    given: dict[str, Any] = {}
    for var, (name, kind) in ENV_OPTIONS.items():
        if env.get(var, "").strip():
            try:
                given[name] = kind(env[var])
            except ValueError:
                what = "seconds (N or LOW-HIGH)" if kind is seconds_range else kind.__name__
                raise ValueError(f"{var}={env[var]!r} is not {what}") from None
    try:
        return ChaosOptions(work_dir=work_dir, **given)
    except ValueError as exc:
        raise ValueError(f"{exc} (from {', '.join(v for v in ENV_OPTIONS if v in env)})") from None


@dataclass(frozen=True)
class Fault:
    """One planned fault: ``target`` (a kind or the broker) dies at ``at_s`` for ``down_s``."""

    at_s: float
    target: str
    down_s: float


def plan_faults(options: ChaosOptions) -> list[Fault]:
    """The faults of a run, in time order, drawn from ``options.seed`` alone."""
    rng = random.Random(options.seed)
    extra = rng.choices(KINDS, k=options.kills - len(KINDS))
    targets = [*KINDS, *extra, *[BROKER] * options.broker_kills]
    rng.shuffle(targets)
    slot = options.seconds / len(targets)
    faults = []
    for i, target in enumerate(targets):
        low, high = options.broker_down_s if target == BROKER else options.restart_pause_s
        at = slot * (i + rng.uniform(0.1, 0.6))
        faults.append(Fault(round(at, 1), target, round(rng.uniform(low, high), 1)))
    return faults
