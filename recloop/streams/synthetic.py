"""Synthetic users' slates and feedback, in causal order, for tests and benchmarks.

Each user runs ``sessions`` sessions of ``steps`` slates. A step is the slate, then one
Impression per shown item, then (when the user clicks) the Click with its reward; a session
closes with a SessionEnd whose ``steps`` counts the answered slates, as the simulator sends
them. Users are interleaved at random, but every user's own events keep their causal order,
which is all Kafka promises per key.

Everything is drawn from one seeded ``random.Random``, so a run is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from recloop.core.events import Click, Impression, Record, SessionEnd, SlateServed

T0 = 1_700_000_000.0


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic workload."""

    users: int = 20
    """How many users."""
    sessions: int = 2
    """Sessions per user, one after the other."""
    steps: int = 4
    """Slates per session."""
    k: int = 3
    """Items per slate."""
    candidates: int = 10
    """Candidate ids per slate, its items among them (interest_evolution offers 10); at
    least ``k``."""
    catalogue: int = 100
    """Item ids are drawn from ``range(catalogue)``."""
    click_prob: float = 0.6
    """Chance that a step ends with a click (otherwise every item is skipped)."""
    seed: int = 0


def user_events(cfg: SyntheticConfig, rng: random.Random, user: int) -> list[Record]:
    """One user's events, in the order they happened."""
    uid = f"u{user}"
    out: list[Record] = []
    ts = T0 + user
    for s in range(cfg.sessions):
        sid = f"{uid}-s{s}"
        for step in range(cfg.steps):
            rid = f"{sid}-r{step}"
            offered = rng.sample(range(cfg.catalogue), max(cfg.candidates, cfg.k))
            items = offered[: cfg.k]
            ts += 1.0
            out.append(
                SlateServed(
                    request_id=rid,
                    user_id=uid,
                    session_id=sid,
                    step=step,
                    ts=ts,
                    request_ts=ts - 0.01,
                    items=items,
                    scores=[1.0] * cfg.k,
                    propensities=[1.0 / cfg.k] * cfg.k,
                    policy="random",
                    policy_version=0,
                    candidates=sorted(offered),
                    observation=[float(step), float(s)],
                )  # fmt: skip
            )
            clicked = rng.randrange(cfg.k) if rng.random() < cfg.click_prob else None
            reward = round(rng.uniform(0.5, 5.0), 3) if clicked is not None else 0.0
            ts += 1.0
            out += slate_feedback(uid, sid, rid, items, clicked, reward, ts)
        out.append(
            SessionEnd(event_id=f"{sid}-end", user_id=uid, session_id=sid, steps=cfg.steps, ts=ts)
        )
    return out


def slate_feedback(
    user_id: str, session_id: str, request_id: str, items: list[int], clicked: int | None,
    reward: float, ts: float,
) -> list[Record]:  # fmt: skip
    """A slate's feedback as the simulator sends it: an Impression per shown item, then the
    Click with its reward when the user clicked."""
    out: list[Record] = [
        Impression(
            event_id=f"{request_id}-i{p}",
            user_id=user_id,
            session_id=session_id,
            request_id=request_id,
            item=item,
            position=p,
            slate_size=len(items),
            clicked=p == clicked,
            ts=ts,
        )  # fmt: skip
        for p, item in enumerate(items)
    ]
    if clicked is not None:
        out.append(
            Click(
                event_id=f"{request_id}-c",
                user_id=user_id,
                session_id=session_id,
                request_id=request_id,
                item=items[clicked],
                position=clicked,
                reward=reward,
                ts=ts,
            )  # fmt: skip
        )
    return out


def causal_events(cfg: SyntheticConfig) -> list[Record]:
    """Every user's events, users interleaved at random, each user's order kept."""
    rng = random.Random(cfg.seed)
    queues = [user_events(cfg, rng, u) for u in range(cfg.users)]
    heads = [0] * cfg.users
    live = [u for u in range(cfg.users) if queues[u]]
    out: list[Record] = []
    while live:
        u = rng.choice(live)
        out.append(queues[u][heads[u]])
        heads[u] += 1
        if heads[u] == len(queues[u]):
            live.remove(u)
    return out


def split_topics(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """The slates (``rec.slates``) and the feedback (``rec.feedback``), each in order."""
    slates: list[Record] = [r for r in records if isinstance(r, SlateServed)]
    feedback = [r for r in records if not isinstance(r, SlateServed)]
    return slates, feedback


def expected_transition_count(cfg: SyntheticConfig) -> int:
    """Every answered slate yields exactly one transition."""
    return cfg.users * cfg.sessions * cfg.steps
