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

Sizes are bounded in the contract, so no record, however hostile, decodes into more than
its limits allow (a decoder refuses a longer list or string, a larger item id, as it
refuses a wrong type). The limits are generous for every world preset (``tiny_world``:
6 items, slate 2; ``interest_evolution``: 10,000 items, 20 features, 10 candidates, slate 3;
``large_catalogue``: 100,000 items, 32-d, no candidate list, slate 5; the serving bench:
100 candidates of 32 features) and they name the outer bounds only: a consumer may cap
below them (the streams fold caps session state far lower), and every record is also
bounded in bytes (``recloop.core.dlq.MAX_RECORD_BYTES``) before it is decoded at all.

- ``MAX_ID_CHARS`` (256): user, session, request, event and transition ids, policy and
  algorithm names, reasons. The simulator's ids are ``<run>-u<n>-s<n>-r<step>``, tens of
  characters; a transition id is 32 hex digits.
- ``MAX_ITEM_ID`` (2**63 - 1): an item id is ``0 <= id <= MAX_ITEM_ID``, so it fits the
  int64 arrays of the learner and serving; whether it names an item of *the* catalogue is
  checked where a catalogue is known (serving).
- ``MAX_COUNT`` (2**63 - 1): steps, positions, versions and other counts fit int64 too.
- ``MAX_CANDIDATES`` (10,000): candidates offered per request (presets offer 0-100; an
  interest-evolution catalogue is 10,000 items, so even "every item" fits).
- ``MAX_FEATURE_DIM`` (1,024): the width of an item's feature row (presets: 6, 20, 32).
- ``MAX_CATALOGUE_ITEMS`` (100,000,000): items of a catalogue announcement (presets: 6 to
  1,000,000); ``MAX_CHUNK_BYTES`` (524,288): the feature bytes of one ``ItemChunk``.
- ``MAX_OBSERVATION`` (1,024): a user observation's length (presets: 6, 20, 32).
- ``MAX_SLATE`` (1,024): a slate's items, scores and propensities, impressed positions,
  ``k`` and a position (presets serve 2-5).
- ``MAX_HISTORY`` (1,024): a view's recent positive items and rewards (the fold keeps 10).
- ``MAX_PENDING_SLATES`` (1,024), ``MAX_PARKED_SLATES`` (1,024), ``MAX_BUFFERED_FEEDBACK``
  (4,096), ``MAX_DONE_REQUESTS`` (4,096), ``MAX_PAST_SESSIONS`` (1,024): the lists of a
  ``SessionState`` (an interest-evolution session is 60-90 slates and ~300 feedback records;
  the fold's own caps are 64 parked, 1,024 buffered, 256 done, 8 past sessions).
- ``MAX_MAP_KEYS`` (1,024): entries of a map such as ``EpisodeOutcome.policy_steps``.

Nesting depth is fixed by the schema (a ``SessionState`` is the deepest, six levels). An
unknown field may nest deeper: msgspec skips it recursively and raises ``RecursionError``
past Python's recursion limit (about 1,000 levels, fewer when called from deep in a stack);
``recloop.core.codec`` turns that, like any other failure, into ``RecordDecodeError``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

_MAX = 1.7976931348623157e308
# NaN fails every comparison and inf exceeds the bounds, so this type admits finite floats only.
Finite = Annotated[float, msgspec.Meta(ge=-_MAX, le=_MAX)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]

MAX_ID_CHARS = 256
MAX_ITEM_ID = 2**63 - 1
MAX_COUNT = 2**63 - 1
MAX_CANDIDATES = 10_000
MAX_FEATURE_DIM = 1_024
MAX_OBSERVATION = 1_024
MAX_SLATE = 1_024
MAX_HISTORY = 1_024
MAX_PENDING_SLATES = 1_024
MAX_PARKED_SLATES = 1_024
MAX_BUFFERED_FEEDBACK = 4_096
MAX_DONE_REQUESTS = 4_096
MAX_PAST_SESSIONS = 1_024
MAX_MAP_KEYS = 1_024
MAX_CATALOGUE_ITEMS = 100_000_000
MAX_CHUNK_BYTES = 524_288

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
ItemId = Annotated[int, msgspec.Meta(ge=0, le=MAX_ITEM_ID)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Position = Annotated[int, msgspec.Meta(ge=0, lt=MAX_SLATE)]
SlateSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_SLATE)]
Observation = Annotated[list[Finite], msgspec.Meta(max_length=MAX_OBSERVATION)]
CandidateIds = Annotated[list[ItemId], msgspec.Meta(max_length=MAX_CANDIDATES)]
SlateItems = Annotated[list[ItemId], msgspec.Meta(max_length=MAX_SLATE)]
SlateScores = Annotated[list[Finite], msgspec.Meta(max_length=MAX_SLATE)]
SlatePropensities = Annotated[list[Probability], msgspec.Meta(max_length=MAX_SLATE)]
Positions = Annotated[list[Position], msgspec.Meta(max_length=MAX_SLATE)]
History = Annotated[list[ItemId], msgspec.Meta(max_length=MAX_HISTORY)]
HistoryRewards = Annotated[list[Finite], msgspec.Meta(max_length=MAX_HISTORY)]

SCHEMA_VERSION = 2
"""Version 2 (the item catalogue): requests, slates, session state and transitions carry item
ids only; features are looked up in the catalogue (``recloop.core.catalogue``). Version 1
records of those four types echoed every candidate's feature rows and are refused with a
reason that says so; records whose shape did not change (feedback, outcomes, announcements)
are read in both versions."""
V1_WITH_FEATURE_ROWS = 1


class Record(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every wire record: a class-name tag and a schema version."""

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({SCHEMA_VERSION})
    v: int = SCHEMA_VERSION


class _IdsOnly(Record, frozen=True, kw_only=True):
    """A record type whose version 1 carried candidate feature rows (no longer read)."""

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({SCHEMA_VERSION})


class _Unchanged(Record, frozen=True, kw_only=True):
    """A record type whose shape version 2 did not change: both versions are read."""

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({V1_WITH_FEATURE_ROWS, SCHEMA_VERSION})


class RecRequest(_IdsOnly, frozen=True, kw_only=True):
    """A user asks for a slate of ``k`` items.

    ``candidates`` restricts the answer to those items (RecSim samples a candidate set each
    step); empty means "retrieve from the whole catalogue". The candidates' features are
    the catalogue's (``recloop.core.catalogue``), looked up by id, never sent.
    ``observation`` is what the user lets the recommender see of them.
    """

    request_id: Id
    user_id: Id
    session_id: Id
    step: Count
    ts: Finite
    k: SlateSize
    observation: Observation = []
    candidates: CandidateIds = []


class SlateServed(_IdsOnly, frozen=True, kw_only=True):
    """The answer to a RecRequest, with everything learning will need later.

    ``propensities[i]`` is the probability under the serving (behaviour) policy that
    ``items[i]`` appears in the slate, as the policy drew it.
    """

    request_id: Id
    user_id: Id
    session_id: Id
    step: Count
    ts: Finite
    request_ts: Finite
    items: SlateItems
    scores: SlateScores
    propensities: SlatePropensities
    policy: Id
    policy_version: Count
    candidates: CandidateIds = []
    observation: Observation = []


class Impression(_Unchanged, frozen=True, kw_only=True):
    """One shown item. ``clicked`` tells whether a Click for this impression follows."""

    event_id: Id
    user_id: Id
    session_id: Id
    request_id: Id
    item: ItemId
    position: Position
    slate_size: SlateSize
    clicked: bool
    ts: Finite


class Click(_Unchanged, frozen=True, kw_only=True):
    """The user consumed ``item``; ``reward`` is the engagement it earned (watch time)."""

    event_id: Id
    user_id: Id
    session_id: Id
    request_id: Id
    item: ItemId
    position: Position
    reward: Finite
    ts: Finite


class SessionEnd(_Unchanged, frozen=True, kw_only=True):
    """The user's session is over (time budget spent, or gave up).

    ``steps`` is how many slates the user answered in the session; consumers that see
    slates and feedback on separate topics wait until they have seen that many outcomes.
    """

    event_id: Id
    user_id: Id
    session_id: Id
    steps: Count
    ts: Finite
    reason: Id = "budget"


Feedback = Impression | Click | SessionEnd


class UserView(msgspec.Struct, frozen=True, kw_only=True):
    """What a policy may condition on: the user's observation and their recent positives."""

    observation: Observation = []
    history: History = []
    history_rewards: HistoryRewards = []
    step: Count = 0
    cumulative_reward: Finite = 0.0


class PendingSlate(msgspec.Struct, frozen=True, kw_only=True):
    """A slate served to a user, with the feedback gathered for it so far."""

    request_id: Id
    step: Count = 0
    items: SlateItems
    propensities: SlatePropensities
    policy: Id
    policy_version: Count
    candidates: CandidateIds = []
    observation: Observation = []
    served_ts: Finite
    impressed_positions: Positions = []
    click_expected: bool = False
    chosen_position: Position | None = None
    reward: Finite = 0.0
    outcome_ts: Finite = 0.0

    @property
    def outcome_known(self) -> bool:
        """Every shown item was impressed and, if one was clicked, its Click arrived."""
        all_seen = len(self.impressed_positions) >= len(self.items)
        return all_seen and (not self.click_expected or self.chosen_position is not None)


class SessionState(_IdsOnly, frozen=True, kw_only=True):
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

    user_id: Id
    session_id: Id
    view: UserView
    frontier: UserView = UserView()
    pending: Annotated[list[PendingSlate], msgspec.Meta(max_length=MAX_PENDING_SLATES)] = []
    early_feedback: Annotated[list[Feedback], msgspec.Meta(max_length=MAX_BUFFERED_FEEDBACK)] = []
    parked: Annotated[list[SlateServed], msgspec.Meta(max_length=MAX_PARKED_SLATES)] = []
    done_requests: Annotated[list[Id], msgspec.Meta(max_length=MAX_DONE_REQUESTS)] = []
    past_sessions: Annotated[list[Id], msgspec.Meta(max_length=MAX_PAST_SESSIONS)] = []
    ended: bool = False
    last_event_ts: Finite = 0.0


class Transition(_IdsOnly, frozen=True, kw_only=True):
    """One answered slate, ready for learning.

    ``transition_id`` is deterministic (user, session, request), so a re-emission after a
    failure carries the same id and consumers can drop it. ``next_state`` is the view the
    user's next request was served with; ``next_slate`` (with its candidates) is the slate
    actually served next, which SARSA targets need; both are empty when ``done``.
    """

    transition_id: Id
    user_id: Id
    session_id: Id
    request_id: Id
    state: UserView
    slate: SlateItems
    propensities: SlatePropensities
    candidates: CandidateIds = []
    policy: Id
    policy_version: Count
    chosen_item: ItemId | None = None
    chosen_position: Position | None = None
    reward: Finite = 0.0
    next_state: UserView
    next_slate: SlateItems = []
    next_candidates: CandidateIds = []
    done: bool = False
    served_ts: Finite
    outcome_ts: Finite


class PolicyPublished(_Unchanged, frozen=True, kw_only=True):
    """A learner published snapshot ``version`` of ``policy`` at ``path``.

    ``path`` is relative to the snapshot root that learner and servers share (each may mount
    it in its own place); serving refuses an absolute path, ``..`` or a symlink out of the
    root (``recloop.core.snapshot``), and with a snapshot key an announcement whose
    ``signature`` does not check (``recloop.core.snapshot_auth``).
    """

    policy: Id
    algorithm: Id
    version: Count
    path: Annotated[str, msgspec.Meta(max_length=4 * MAX_ID_CHARS)]
    weights_sha256: Id
    manifest_sha256: Id
    created_ts: Finite
    transitions_applied: Count = 0
    metrics: Annotated[dict[Id, Finite], msgspec.Meta(max_length=MAX_MAP_KEYS)] = {}
    signature: Id = ""
    """The learner's HMAC-SHA256 of the announcement (``recloop.core.snapshot_auth``), hex; empty
    when the learner has no snapshot key."""


PolicyStepKey = Annotated[str, msgspec.Meta(max_length=2 * MAX_ID_CHARS)]
"""``"policy:version"``: a policy name and a version."""


class EpisodeOutcome(_Unchanged, frozen=True, kw_only=True):
    """Ground truth the simulator knows about one finished session (never used for learning).

    ``policy_steps`` counts the slates served by each ``"policy:version"``.
    """

    user_id: Id
    session_id: Id
    ts: Finite
    total_return: Finite
    steps: Count
    clicks: Count
    clicked_quality_sum: Finite = 0.0
    policy_steps: Annotated[dict[PolicyStepKey, Count], msgspec.Meta(max_length=MAX_MAP_KEYS)] = {}


class ItemChunk(Record, frozen=True, kw_only=True):
    """Feature rows of the items ``first_item .. first_item + n - 1``: a piece of the catalogue.

    ``features`` are the ``n x dim`` float32 values, little-endian, row-major (base64 in the
    JSON wire format: a third of the size of decimal floats, and exact). Published on the
    compacted ``items`` topic keyed by ``first_item``, so the topic always holds the newest
    rows of every chunk and a process that joins late reads the whole catalogue from it
    (``recloop.core.catalogue``). The byte length, the finiteness of every value and the
    width are checked where chunks are assembled, not by the decoder.
    """

    first_item: ItemId
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_CATALOGUE_ITEMS)]
    dim: Annotated[int, msgspec.Meta(ge=0, le=MAX_FEATURE_DIM)]
    features: Annotated[bytes, msgspec.Meta(max_length=MAX_CHUNK_BYTES)]
    ts: Finite = 0.0


class CatalogueAnnounced(Record, frozen=True, kw_only=True):
    """Catalogue ``version`` is complete on the ``items`` topic: ``n_items`` items (ids
    ``0 .. n_items - 1``) of ``feature_dim`` features, whose matrix hashes to ``sha256``
    (``recloop.core.catalogue.digest``). Published on the compacted ``catalogue`` topic after
    every chunk of the version was acknowledged."""

    version: Count
    n_items: Annotated[int, msgspec.Meta(ge=1, le=MAX_CATALOGUE_ITEMS)]
    feature_dim: Annotated[int, msgspec.Meta(ge=0, le=MAX_FEATURE_DIM)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    ts: Finite = 0.0


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
    ItemChunk,
    CatalogueAnnounced,
)
