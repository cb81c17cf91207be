"""The event contract: every record that crosses a process boundary, defined once.

Records are frozen ``msgspec.Struct`` types. Each carries ``v``, its schema version,
and a ``type`` tag (the class name) so that one topic can hold several record types
(``rec.feedback`` holds Impression, Click and SessionEnd). Only ``recloop.core.codec`` knows how
they look on the wire.

Conventions: times ``ts`` are UNIX epoch seconds (float); user, session, request and
event ids are strings; items are integer ids into the catalogue. Float fields use
``Finite``: decoding NaN or infinity is an error, not a silent poison for learning. On the
JSON wire msgspec's parser already refuses them (NaN and Infinity are not JSON, 1e999
overflows); the bounds make every other decoder refuse them too (``msgspec.convert`` from
Python objects, MessagePack), so the contract does not rest on the format.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

_MAX = 1.7976931348623157e308
# NaN fails every comparison and inf exceeds the bounds, so this type admits finite floats only.
Finite = Annotated[float, msgspec.Meta(ge=-_MAX, le=_MAX)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]

SCHEMA_VERSION = 1


class Record(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every wire record: a class-name tag and a schema version."""

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({SCHEMA_VERSION})
    v: int = SCHEMA_VERSION


class RecRequest(Record, frozen=True, kw_only=True):
    """A user asks for a slate of ``k`` items.

    ``candidates`` restricts the answer to those items (RecSim samples a candidate set each
    step); empty means "retrieve from the whole catalogue". ``candidate_features`` are the
    documents' observable features, row per candidate (may be empty for id-only worlds).
    ``observation`` is what the user lets the recommender see of them.
    """

    request_id: str
    user_id: str
    session_id: str
    step: NonNegInt
    ts: Finite
    k: Annotated[int, msgspec.Meta(ge=1)]
    observation: list[Finite] = []
    candidates: list[int] = []
    candidate_features: list[list[Finite]] = []


class SlateServed(Record, frozen=True, kw_only=True):
    """The answer to a RecRequest, with everything learning will need later.

    ``propensities[i]`` is the probability under the serving (behaviour) policy that
    ``items[i]`` appears in the slate, as the policy drew it.
    """

    request_id: str
    user_id: str
    session_id: str
    step: NonNegInt
    ts: Finite
    request_ts: Finite
    items: list[int]
    scores: list[Finite]
    propensities: list[Probability]
    policy: str
    policy_version: NonNegInt
    candidates: list[int] = []
    candidate_features: list[list[Finite]] = []
    observation: list[Finite] = []


class SlateAnswer(Record, frozen=True, kw_only=True, tag="SlateServed"):
    """The part of a ``SlateServed`` that a simulated user acts on: the same wire record,
    decoded without the rest.

    A slate echoes its request's candidate features for learning; the simulator never reads
    them, and decoding them took a third of its CPU. The JSON is still checked whole, and
    the fields named here as strictly as in ``SlateServed``; the streams fold and the learner
    decode (and dead-letter) full slates.
    """

    request_id: str
    user_id: str
    session_id: str
    items: list[int]
    policy: str
    policy_version: NonNegInt


class Impression(Record, frozen=True, kw_only=True):
    """One shown item. ``clicked`` tells whether a Click for this impression follows."""

    event_id: str
    user_id: str
    session_id: str
    request_id: str
    item: int
    position: NonNegInt
    slate_size: Annotated[int, msgspec.Meta(ge=1)]
    clicked: bool
    ts: Finite


class Click(Record, frozen=True, kw_only=True):
    """The user consumed ``item``; ``reward`` is the engagement it earned (watch time)."""

    event_id: str
    user_id: str
    session_id: str
    request_id: str
    item: int
    position: NonNegInt
    reward: Finite
    ts: Finite


class SessionEnd(Record, frozen=True, kw_only=True):
    """The user's session is over (time budget spent, or gave up).

    ``steps`` is how many slates the user answered in the session; consumers that see
    slates and feedback on separate topics wait until they have seen that many outcomes.
    """

    event_id: str
    user_id: str
    session_id: str
    steps: NonNegInt
    ts: Finite
    reason: str = "budget"


Feedback = Impression | Click | SessionEnd


class UserView(msgspec.Struct, frozen=True, kw_only=True):
    """What a policy may condition on: the user's observation and their recent positives."""

    observation: list[Finite] = []
    history: list[int] = []
    history_rewards: list[Finite] = []
    step: NonNegInt = 0
    cumulative_reward: Finite = 0.0


class PendingSlate(msgspec.Struct, frozen=True, kw_only=True):
    """A slate served to a user, with the feedback gathered for it so far."""

    request_id: str
    step: NonNegInt = 0
    items: list[int]
    propensities: list[Probability]
    policy: str
    policy_version: NonNegInt
    candidates: list[int] = []
    candidate_features: list[list[Finite]] = []
    observation: list[Finite] = []
    served_ts: Finite
    impressed_positions: list[int] = []
    click_expected: bool = False
    chosen_position: NonNegInt | None = None
    reward: Finite = 0.0
    outcome_ts: Finite = 0.0

    @property
    def outcome_known(self) -> bool:
        """Every shown item was impressed and, if one was clicked, its Click arrived."""
        all_seen = len(self.impressed_positions) >= len(self.items)
        return all_seen and (not self.click_expected or self.chosen_position is not None)


class SessionState(Record, frozen=True, kw_only=True):
    """Per-user session state: the streams fold's value, compacted on ``session.state``.

    ``view`` is what serving conditions on: every known outcome applied. ``frontier`` is the
    view as it was when the oldest pending slate was served (the next transition's state).
    ``pending`` holds served slates whose outcome or successor is not known yet, oldest first; ``early_feedback`` holds feedback that
    arrived before its slate; ``parked`` holds slates of the user's next session that
    arrived before this one ended; ``done_requests`` names this session's slates whose
    transition was already emitted, so their repeated slates and feedback are dropped (the
    pending slates drop their own repeats: each impressed position and the click count once);
    ``past_sessions`` names recent finished sessions, so late events of theirs are dropped.
    """

    user_id: str
    session_id: str
    view: UserView
    frontier: UserView = UserView()
    pending: list[PendingSlate] = []
    early_feedback: list[Feedback] = []
    parked: list[SlateServed] = []
    done_requests: list[str] = []
    past_sessions: list[str] = []
    ended: bool = False
    last_event_ts: Finite = 0.0


class Transition(Record, frozen=True, kw_only=True):
    """One answered slate, ready for learning.

    ``transition_id`` is deterministic (user, session, request), so a re-emission after a
    failure carries the same id and consumers can drop it. ``next_state`` is the view the
    user's next request was served with; ``next_slate`` (with its candidates) is the slate
    actually served next, which SARSA targets need; both are empty when ``done``.
    """

    transition_id: str
    user_id: str
    session_id: str
    request_id: str
    state: UserView
    slate: list[int]
    propensities: list[Probability]
    candidates: list[int] = []
    candidate_features: list[list[Finite]] = []
    policy: str
    policy_version: NonNegInt
    chosen_item: int | None = None
    chosen_position: NonNegInt | None = None
    reward: Finite = 0.0
    next_state: UserView
    next_slate: list[int] = []
    next_candidates: list[int] = []
    next_candidate_features: list[list[Finite]] = []
    done: bool = False
    served_ts: Finite
    outcome_ts: Finite


class PolicyPublished(Record, frozen=True, kw_only=True):
    """A learner published snapshot ``version`` of ``policy`` at ``path``.

    ``path`` is relative to the snapshot root that learner and servers share (each may mount
    it in its own place), or absolute when the snapshot lies outside that root.
    """

    policy: str
    algorithm: str
    version: NonNegInt
    path: str
    weights_sha256: str
    manifest_sha256: str
    created_ts: Finite
    transitions_applied: NonNegInt = 0
    metrics: dict[str, Finite] = {}
    signature: str = ""
    """The learner's HMAC-SHA256 of the announcement (``recloop.core.snapshot``), hex; empty
    when the learner has no snapshot key."""


class EpisodeOutcome(Record, frozen=True, kw_only=True):
    """Ground truth the simulator knows about one finished session (never used for learning).

    ``policy_steps`` counts the slates served by each ``"policy:version"``.
    """

    user_id: str
    session_id: str
    ts: Finite
    total_return: Finite
    steps: NonNegInt
    clicks: NonNegInt
    clicked_quality_sum: Finite = 0.0
    policy_steps: dict[str, int] = {}


ALL_RECORD_TYPES: tuple[type[Record], ...] = (
    RecRequest,
    SlateServed,
    Impression,
    Click,
    SessionEnd,
    SessionState,
    Transition,
    PolicyPublished,
    EpisodeOutcome,
)
