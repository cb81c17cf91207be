"""The session fold: ``apply(state, event) -> (state, transitions)``, pure and deterministic.

Slates (``rec.slates``) and feedback (``rec.feedback``) of one user arrive on two topics, so
their interleaving is arbitrary even though each topic is ordered per user. The fold
therefore:

- keeps every served slate as *pending* until its outcome is known: all of its impressions
  arrived and, if one was marked clicked, its Click (with the reward) arrived too;
- buffers feedback that arrives before its slate (``early_feedback``) and replays it when
  the slate comes;
- emits the transition of a slate only once its *successor* is known: the next slate of the
  session (which gives the exact next observation and the next served slate that SARSA
  needs) or the session's end (``done``). A completed outcome is folded into the view at
  once, so serving sees fresh history without waiting;
- is idempotent: a repeated slate, a repeated impression or click, or an event of a
  finished session changes nothing. Repeats are recognised by what they are (the slate's
  request, the impressed position, the click of a slate), not by remembering every event
  id: the state stays small, and every state change is encoded and sent;
- keeps a user's *next* session waiting until the current one ends: its slates are parked
  and its feedback buffered, because the slates topic may run ahead of the feedback topic
  and the current session's last outcomes and SessionEnd may still be on their way. The
  next session starts as soon as the current one ends (SessionEnd, inactivity, or too many
  parked slates);
- ``expire(state, now, timeout)`` ends a session that has gone quiet and emits its terminal
  transition, so sessions that never end still teach the learner.

Transition ids are a hash of (user, session, request), so a re-emission after a crash carries
the same id and downstream consumers drop it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgspec

from recloop.core.events import (
    Click,
    Impression,
    PendingSlate,
    Record,
    SessionEnd,
    SessionState,
    SlateServed,
    Transition,
    UserView,
)


@dataclass(frozen=True)
class FoldConfig:
    """Limits that keep the per-user state small."""

    history_len: int = 10
    """How many recent positively-answered items the view keeps (DRR uses the last 5)."""
    done_requests: int = 256
    """How many of the session's answered slates are remembered, so their repeats are dropped."""
    past_sessions: int = 8
    """How many finished session ids are remembered, so their late events are dropped."""
    early_feedback: int = 64
    """Most feedback records buffered while waiting for their slate."""
    parked_slates: int = 32
    """Most slates of a user's next session parked while the current one is still open;
    one more closes the current session as abandoned."""


# The fold's state is the contract's SessionState (it carries ``parked`` slates too).
FoldState = SessionState


class InvalidEvent(ValueError):
    """A well-formed event that contradicts its slate (position outside it, wrong item)."""


DEFAULT = FoldConfig()

# isinstance() with a tuple is much cheaper than with a ``X | Y`` union, and this is per event.
_FOLDED = (SlateServed, Impression, Click, SessionEnd)

_replace = msgspec.structs.replace


def transition_id(user_id: str, session_id: str, request_id: str) -> str:
    """Deterministic id of the transition for one answered slate."""
    digest = hashlib.sha1(f"{user_id}\x1f{session_id}\x1f{request_id}".encode()).hexdigest()
    return digest[:32]


def new_state(user_id: str, session_id: str) -> FoldState:
    return FoldState(user_id=user_id, session_id=session_id, view=UserView())


def apply(
    state: SessionState | None, event: Record, config: FoldConfig = DEFAULT
) -> tuple[FoldState, list[Transition]]:
    """Fold one slate or feedback event into a user's state; return new state and transitions.

    Raises ``InvalidEvent`` for feedback that contradicts its slate; the state is unchanged.
    """
    if not isinstance(event, _FOLDED):
        raise TypeError(f"the session fold takes slates and feedback, not {type(event).__name__}")
    if state is None:
        state = new_state(event.user_id, event.session_id)
    if event.session_id in state.past_sessions:
        return state, []  # a late event of a session that is already over
    if event.session_id != state.session_id:
        if type(event) is not SlateServed:
            return _buffer(state, event, config), []  # feedback before its session's slate
        if state.ended:
            return _apply_slate(_start_session(state, event.session_id), event, config)
        return _park(state, event, config)
    if state.ended:
        return state, []
    if type(event) is SlateServed:
        return _apply_slate(state, event, config)
    return _apply_feedback(state, event, config)  # type: ignore[arg-type]


def expire(
    state: SessionState, now: float, timeout_s: float, config: FoldConfig = DEFAULT
) -> tuple[FoldState, list[Transition]]:
    """End a session idle for longer than ``timeout_s``, emitting its terminal transition."""
    if state.ended or now - state.last_event_ts < timeout_s:
        return state, []
    return _end_session(state, now, config)


def _park(
    state: FoldState, slate: SlateServed, config: FoldConfig
) -> tuple[FoldState, list[Transition]]:
    """Hold a slate of the user's next session until the current session ends."""
    if any(p.request_id == slate.request_id for p in state.parked):
        return state, []
    state = _replace(state, parked=[*state.parked, slate])
    if len(state.parked) <= config.parked_slates:
        return state, []
    # The current session never ended and the user has moved on for a while: close it.
    return _end_session(state, state.last_event_ts, config)


def _start_session(state: FoldState, session_id: str) -> FoldState:
    """A fresh state for ``session_id`` that keeps what belongs to later sessions."""
    fresh = new_state(state.user_id, session_id)
    return _replace(
        fresh,
        past_sessions=state.past_sessions,
        early_feedback=state.early_feedback,
        parked=[p for p in state.parked if p.session_id != session_id],
        last_event_ts=state.last_event_ts,
    )


def _start_parked(state: FoldState, config: FoldConfig) -> tuple[FoldState, list[Transition]]:
    """After a session ended, start the next one from its parked slates, if any arrived."""
    if not state.parked:
        return state, []
    session_id = state.parked[0].session_id
    slates = sorted((p for p in state.parked if p.session_id == session_id), key=lambda p: p.step)
    state = _start_session(state, session_id)
    out: list[Transition] = []
    for slate in slates:
        state, more = apply(state, slate, config)
        out += more
    return state, out


def _event_key(event: Record) -> str:
    if isinstance(event, SlateServed):
        return f"slate:{event.request_id}"
    return event.event_id  # type: ignore[attr-defined]


def _buffer(state: FoldState, event: Record, config: FoldConfig) -> FoldState:
    key = _event_key(event)
    if any(_event_key(e) == key for e in state.early_feedback):
        return state
    buffered = [*state.early_feedback, event][-config.early_feedback :]
    return _replace(state, early_feedback=buffered)


def _apply_slate(
    state: FoldState, slate: SlateServed, config: FoldConfig
) -> tuple[FoldState, list[Transition]]:
    request_id = slate.request_id
    if request_id in state.done_requests or any(p.request_id == request_id for p in state.pending):
        return state, []  # a repeat (the simulator retries requests that went unanswered)
    pending = PendingSlate(
        request_id=request_id,
        step=slate.step,
        items=slate.items,
        propensities=slate.propensities,
        policy=slate.policy,
        policy_version=slate.policy_version,
        candidates=slate.candidates,
        candidate_features=slate.candidate_features,
        observation=slate.observation,
        served_ts=slate.ts,
    )
    # Pending slates stay in step order, so the oldest is always first.
    if state.pending and state.pending[-1].step > slate.step:
        pendings = sorted([*state.pending, pending], key=lambda p: p.step)
    else:
        pendings = [*state.pending, pending]
    view = state.view
    if slate.observation:
        # Serving conditions on the newest observation the user has shown.
        view = _replace(view, observation=slate.observation)
    state = _replace(
        state, pending=pendings, view=view, last_event_ts=max(slate.ts, state.last_event_ts)
    )
    state, out = _release_ready(state, config)
    # Feedback that came before this slate can be applied now.
    waiting = [
        f
        for f in state.early_feedback
        if getattr(f, "request_id", None) == request_id
        or (isinstance(f, SessionEnd) and f.session_id == state.session_id)
    ]
    if waiting:
        state = _replace(state, early_feedback=[f for f in state.early_feedback if f not in waiting])
        for feedback in waiting:
            try:
                state, more = apply(state, feedback, config)
            except InvalidEvent:
                # Only now can this buffered record be checked against its slate; the pure
                # fold has nowhere to send it, and applying it would corrupt the outcome.
                continue
            out += more
    return state, out


def _apply_feedback(
    state: FoldState, event: Impression | Click | SessionEnd, config: FoldConfig
) -> tuple[FoldState, list[Transition]]:
    if isinstance(event, SessionEnd):
        if state.view.step < event.steps:
            # The last slates (on the other topic) or their outcomes are still on their way;
            # wait for them so the terminal transition is the right one.
            return _buffer(state, event, config), []
        return _end_session(state, event.ts, config)
    request_id = event.request_id
    index = -1
    for i, p in enumerate(state.pending):
        if p.request_id == request_id:
            index = i
            break
    if index < 0:
        if request_id in state.done_requests:
            return state, []  # feedback repeated after its slate's transition went out
        return _buffer(state, event, config), []
    before = state.pending[index]
    _check_matches(before, event)
    if isinstance(event, Impression):
        if event.position in before.impressed_positions:
            return state, []
        slate = _replace(
            before,
            impressed_positions=[*before.impressed_positions, event.position],
            click_expected=before.click_expected or event.clicked,
            outcome_ts=max(before.outcome_ts, event.ts),
        )
    else:
        if before.chosen_position is not None:
            return state, []
        slate = _replace(
            before,
            chosen_position=event.position,
            click_expected=True,
            reward=event.reward,
            outcome_ts=max(before.outcome_ts, event.ts),
        )
    pending = list(state.pending)
    pending[index] = slate
    view = state.view
    if slate.outcome_known and not before.outcome_known:
        view = _advance(view, slate, config)
    state = _replace(
        state, pending=pending, view=view, last_event_ts=max(event.ts, state.last_event_ts)
    )
    state, out = _release_ready(state, config)
    if not state.early_feedback:
        return state, out
    # A SessionEnd buffered behind this outcome may now be applied.
    ends = [
        f
        for f in state.early_feedback
        if isinstance(f, SessionEnd) and f.session_id == state.session_id
    ]
    if ends and state.view.step >= ends[0].steps:
        state = _replace(state, early_feedback=[f for f in state.early_feedback if f not in ends])
        state, more = _apply_feedback(state, ends[0], config)
        out += more
    return state, out


def _check_matches(slate: PendingSlate, event: Impression | Click) -> None:
    if 0 <= event.position < len(slate.items) and slate.items[event.position] == event.item:
        return
    raise InvalidEvent(
        f"{type(event).__name__} {event.event_id}: item {event.item} at position "
        f"{event.position} is not in slate {slate.request_id} {slate.items}"
    )


def _advance(view: UserView, slate: PendingSlate, config: FoldConfig) -> UserView:
    """The view after a slate's outcome: history grows only on a click (positive feedback)."""
    history, rewards = view.history, view.history_rewards
    if slate.chosen_position is not None:
        history = [*history, slate.items[slate.chosen_position]][-config.history_len :]
        rewards = [*rewards, slate.reward][-config.history_len :]
    return UserView(
        observation=view.observation,
        history=history,
        history_rewards=rewards,
        step=view.step + 1,
        cumulative_reward=view.cumulative_reward + slate.reward,
    )


def _release_ready(state: FoldState, config: FoldConfig) -> tuple[FoldState, list[Transition]]:
    """Emit transitions for answered slates whose successor slate is already known."""
    pending = state.pending
    if len(pending) < 2 or not pending[0].outcome_known:
        return state, []
    out: list[Transition] = []
    done = list(state.done_requests)
    frontier = state.frontier
    while len(pending) >= 2 and pending[0].outcome_known:
        answered, successor = pending[0], pending[1]
        before = _with_observation(frontier, answered)
        after = _with_observation(_advance(before, answered, config), successor)
        out.append(_transition(state, answered, before, after, successor, done=False))
        done.append(answered.request_id)
        pending = pending[1:]
        frontier = after
    done = done[-config.done_requests :]
    return _replace(state, pending=pending, frontier=frontier, done_requests=done), out


def _with_observation(view: UserView, slate: PendingSlate) -> UserView:
    """The view with the observation the user showed when ``slate`` was requested."""
    if not slate.observation:
        return view
    return _replace(view, observation=slate.observation)


def _end_session(
    state: FoldState, ts: float, config: FoldConfig
) -> tuple[FoldState, list[Transition]]:
    """Close the session: the last answered slate becomes a terminal transition."""
    state, out = _release_ready(state, config)
    pending = state.pending
    if pending and pending[0].outcome_known:
        before = _with_observation(state.frontier, pending[0])
        after = _advance(before, pending[0], config)
        out.append(_transition(state, pending[0], before, after, None, done=True))
    past = [*state.past_sessions, state.session_id][-config.past_sessions :]
    ended = _replace(
        state,
        pending=[],
        # Feedback of later sessions stays buffered for them; this session's is moot now.
        early_feedback=[f for f in state.early_feedback if f.session_id != state.session_id],
        ended=True,
        done_requests=[],
        past_sessions=past,
        last_event_ts=max(ts, state.last_event_ts),
    )
    ended, more = _start_parked(ended, config)
    return ended, out + more


def _transition(
    state: FoldState,
    slate: PendingSlate,
    before: UserView,
    after: UserView,
    successor: PendingSlate | None,
    done: bool,
) -> Transition:
    chosen = slate.chosen_position
    return Transition(
        transition_id=transition_id(state.user_id, state.session_id, slate.request_id),
        user_id=state.user_id,
        session_id=state.session_id,
        request_id=slate.request_id,
        state=before,
        slate=slate.items,
        propensities=slate.propensities,
        candidates=slate.candidates,
        candidate_features=slate.candidate_features,
        policy=slate.policy,
        policy_version=slate.policy_version,
        chosen_item=slate.items[chosen] if chosen is not None else None,
        chosen_position=chosen,
        reward=slate.reward,
        next_state=after,
        next_slate=successor.items if successor else [],
        next_candidates=successor.candidates if successor else [],
        next_candidate_features=successor.candidate_features if successor else [],
        done=done,
        served_ts=slate.served_ts,
        outcome_ts=slate.outcome_ts,
    )
