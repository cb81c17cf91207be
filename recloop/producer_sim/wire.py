"""The wire events a simulated user causes, built in one place for every transport.

The in-process runner hands these records to its sink and the Kafka shell publishes them, so
both produce exactly the same events. Per user, in causal order:

    RecRequest -> SlateServed (from the policy) -> Impression per shown item
    -> Click (if any) -> SessionEnd (when the budget is spent) -> EpisodeOutcome (truth)

Ids are deterministic (user serial, step, position), so a run is reproducible and a
consumer can drop a re-delivered event by id.
"""

from __future__ import annotations

from collections.abc import Sequence

from recloop.core.events import (
    Click,
    EpisodeOutcome,
    Impression,
    Record,
    RecRequest,
    SessionEnd,
    SlateServed,
)
from recloop.core.ports import Slate


def user_id_for(run_tag: str, serial: int) -> str:
    """The id of the ``serial``-th user of a run (one session per simulated user)."""
    return f"{run_tag}-u{serial}"


def session_id_for(user_id: str) -> str:
    return f"{user_id}-s0"


def request_id_for(session_id: str, step: int) -> str:
    return f"{session_id}-r{step}"


def make_request(
    user_id: str,
    step: int,
    ts: float,
    k: int,
    observation: list[float],
    candidates: list[int],
) -> RecRequest:
    """A request for a slate of ``k``; empty ``candidates`` means "the whole catalogue".

    Candidates are item ids only: their features are in the catalogue the simulator
    published before its first request (``recloop.kafka.catalogue``). Takes plain lists:
    the caller converts numpy arrays once per batch, not per request.
    """
    session_id = session_id_for(user_id)
    return RecRequest(
        request_id=request_id_for(session_id, step),
        user_id=user_id,
        session_id=session_id,
        step=step,
        ts=ts,
        k=k,
        observation=observation,
        candidates=candidates,
    )


def make_slate_served(
    request: RecRequest, slate: Slate, policy: str, policy_version: int, ts: float
) -> SlateServed:
    """The SlateServed a server publishes for ``request`` when its policy answered ``slate``."""
    return SlateServed(
        request_id=request.request_id,
        user_id=request.user_id,
        session_id=request.session_id,
        step=request.step,
        ts=ts,
        request_ts=request.ts,
        items=[int(i) for i in slate.items],
        scores=[float(s) for s in slate.scores],
        propensities=[float(p) for p in slate.propensities],
        policy=policy,
        policy_version=policy_version,
        candidates=request.candidates,
        observation=request.observation,
    )


def make_feedback(
    request: RecRequest,
    items: Sequence[int],
    position: int,
    reward: float,
    done: bool,
    ts: float,
) -> list[Record]:
    """Impressions for the shown ``items``, a Click at ``position`` (-1: none), a SessionEnd."""
    rid, uid, sid = request.request_id, request.user_id, request.session_id
    k = len(items)
    out: list[Record] = [
        Impression(
            event_id=f"{rid}-i{p}",
            user_id=uid,
            session_id=sid,
            request_id=rid,
            item=int(item),
            position=p,
            slate_size=k,
            clicked=p == position,
            ts=ts,
        )
        for p, item in enumerate(items)
    ]
    if position >= 0:
        out.append(
            Click(
                event_id=f"{rid}-c",
                user_id=uid,
                session_id=sid,
                request_id=rid,
                item=int(items[position]),
                position=position,
                reward=float(reward),
                ts=ts,
            )
        )
    if done:
        out.append(
            SessionEnd(
                event_id=f"{sid}-end", user_id=uid, session_id=sid, steps=request.step + 1, ts=ts
            )
        )
    return out


def make_outcome(
    user_id: str,
    ts: float,
    total_return: float,
    steps: int,
    clicks: int,
    clicked_quality_sum: float,
    policy_steps: dict[str, int],
) -> EpisodeOutcome:
    """Ground truth about a finished session, for dashboards and evaluation only."""
    return EpisodeOutcome(
        user_id=user_id,
        session_id=session_id_for(user_id),
        ts=ts,
        total_return=float(total_return),
        steps=int(steps),
        clicks=int(clicks),
        clicked_quality_sum=float(clicked_quality_sum),
        policy_steps=dict(policy_steps),
    )


def policy_key(policy: str, version: int) -> str:
    """How EpisodeOutcome.policy_steps names a served policy version."""
    return f"{policy}:{version}"
