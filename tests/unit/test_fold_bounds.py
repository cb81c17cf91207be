"""Session state stays under ``FoldConfig.max_state_bytes`` whatever the records hold.

Issue 12, finding 3: three 406 kB slates built a session state over the broker's record
limit. Since schema v2 (issue 13) a slate carries candidate ids, not feature rows, so the
largest slate the contract accepts is about 300 kB (10,000 candidate ids and every list at
its bound); three of those would still make a state over the limit. The fold's caps (``recloop.streams.fold``, "Bounded state") refuse what would take a
state past them with ``BufferFull``, which the shells dead-letter with the reason; the
worst case of what they admit is computed by ``max_state_bytes`` and checked here on the
largest state the caps allow.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recloop.core import codec, dlq, events
from recloop.core.events import (
    Click,
    Impression,
    PendingSlate,
    SessionEnd,
    SessionState,
    SlateServed,
    UserView,
)
from recloop.streams import fold
from recloop.streams.batch import BatchFolder, RawRecord

U = "u1"
WORST_FLOAT = -2.2250738585072014e-308  # the longest float JSON has: 24 characters
WORST_PROBABILITY = 2.2250738585072014e-308  # the longest a probability takes: 23
TOP = 2**63 - 1  # the longest integer a held slate may carry (19 digits)
CONFIG = fold.DEFAULT


def _worst_id(config: fold.FoldConfig = CONFIG) -> str:
    return '"' * config.id_chars  # printable ASCII, each character escaped to two bytes


def _slate(rid: str, step: int, session: str = "s1", candidates: int = 0, first: int = 0,
           **fields) -> SlateServed:  # fmt: skip
    """A slate of three items offered from ``candidates`` ids counting down from ``first``
    (default: up from 0)."""
    ids = [first - i for i in range(candidates)] if first else list(range(candidates))
    return SlateServed(
        request_id=rid, user_id=U, session_id=session, step=step, ts=100.0 + step,
        request_ts=100.0 + step, items=[1, 2, 3], scores=[0.0] * 3, propensities=[0.5] * 3,
        policy="p", policy_version=1, candidates=ids, **fields,
    )  # fmt: skip


def _fold(records: list, config: fold.FoldConfig = CONFIG):
    """Fold one record per batch, as a worker may, keeping every state it encodes."""
    folder = BatchFolder("slates", "feedback", config)
    table: dict[bytes, bytes] = {}
    sizes, rejects = [], []
    for i, record in enumerate(records):
        topic = "slates" if isinstance(record, SlateServed) else "feedback"
        raw = RawRecord(topic, 0, i, record.user_id.encode(), codec.encode(record))
        result = folder.fold([raw], table.get)
        rejects += [reason for _, reason in result.rejects]
        for key, (_, encoded, _) in result.states.items():
            table[key] = encoded
            sizes.append(len(encoded))
    return sizes, rejects


def test_the_worst_case_is_far_below_what_a_consumer_decodes():
    assert CONFIG.max_state_bytes <= 540_000 < dlq.MAX_RECORD_BYTES < 1_000_000


def _largest_slate(rid: str, step: int) -> SlateServed:
    """About the largest slate the contract accepts: every list at its bound, ids at 19
    digits, floats at their longest."""
    k = events.MAX_SLATE
    return msgspec.structs.replace(
        _slate(rid, step, candidates=events.MAX_CANDIDATES, first=TOP,
               observation=[WORST_FLOAT] * events.MAX_OBSERVATION),
        items=[TOP - i for i in range(k)], scores=[WORST_FLOAT] * k,
        propensities=[WORST_PROBABILITY] * k,
    )  # fmt: skip


def test_three_of_the_largest_slates_cannot_build_a_state_over_the_record_limit():
    slates = [_largest_slate(f"r{i}", i) for i in range(3)]
    assert all(290_000 < len(codec.encode(s)) < 310_000 for s in slates)
    assert all(codec.decode(codec.encode(s), SlateServed) == s for s in slates)  # accepted
    sizes, rejects = _fold(slates)
    assert max(sizes, default=0) < dlq.MAX_RECORD_BYTES  # a consumer still decodes it
    assert max(sizes, default=0) <= CONFIG.max_state_bytes
    assert len(rejects) == 3  # each dead-lettered by the shell with its reason ...
    assert all(r.endswith("an observation of 1024 (buffer full: observation_len=256)")
               for r in rejects)  # fmt: skip
    # ... and counted as an overflow of the cap it hit.
    assert [fold.overflow_cap(r) for r in rejects] == ["observation_len"] * 3
    # Within the observation cap, the candidate ids alone are too many numbers to hold.
    short = [msgspec.structs.replace(s, observation=[WORST_FLOAT] * 256) for s in slates]
    _, rejects = _fold(short)
    assert all(r.endswith("carries 14352 numbers (buffer full: slate_numbers=2048)")
               for r in rejects) and len(rejects) == 3  # fmt: skip


def test_held_slates_of_the_worst_content_are_refused_past_the_caps():
    # Slates of the longest ids and numbers, each carrying as many numbers as one may.
    worst = dict(candidates=CONFIG.slate_numbers - 12 - 256, first=TOP,
                 observation=[WORST_FLOAT] * 256)  # fmt: skip
    ids = _worst_id()
    pending = [_slate(f"{i:03d}" + ids[3:], i, **worst) for i in range(8)]
    assert fold.slate_numbers(pending[0]) == CONFIG.slate_numbers
    parked = [_slate(f"q{i:03d}" + ids[4:], i, session="s2", **worst) for i in range(8)]
    sizes, rejects = _fold([*pending, *parked])
    # held_numbers fits five such slates: the rest are refused for it, the state bounded.
    assert [fold.overflow_cap(r) for r in rejects] == ["held_numbers"] * 11
    assert max(sizes) <= CONFIG.max_state_bytes


def test_past_pending_slates_and_early_feedback_records_are_refused():
    config = dataclasses.replace(CONFIG, pending_slates=4, parked_slates=2, early_feedback=3)
    slates = [_slate(f"r{i}", i) for i in range(6)]
    feedback = [Impression(event_id=f"e{i}", user_id=U, session_id="s1", request_id=f"x{i}",
                           item=1, position=0, slate_size=3, clicked=False, ts=1.0)
                for i in range(5)]  # fmt: skip
    _, rejects = _fold([*slates, *feedback], config)
    assert [fold.overflow_cap(r) for r in rejects] == ["pending_slates"] * 2 + [
        "early_feedback"
    ] * 2


@pytest.mark.parametrize(
    "record, cap",
    [
        (_slate("r" * 49, 0), "id_chars"),
        (_slate("r0", 0, session="s" * 900_000), "id_chars"),
        (_slate("r\x01", 0), "id_chars"),
        (_slate("r0", 0, observation=[0.0] * 257), "observation_len"),
        (_slate("r0", 0, candidates=2037), "slate_numbers"),
        (
            Click(
                event_id="c",
                user_id=U,
                session_id="s1",
                request_id="r",
                item=1,
                position=0,
                reward=1e308,
                ts=1.0,
            ),
            "max_reward",
        ),  # fmt: skip
        (
            SessionEnd(event_id="e", user_id=U, session_id="s" * 900_000, steps=0, ts=1.0),
            "id_chars",
        ),  # fmt: skip
        (
            Impression(
                event_id="e" * 250,
                user_id=U,
                session_id="s1",
                request_id="r" * 200,
                item=1,
                position=0,
                slate_size=3,
                clicked=False,
                ts=1.0,
            ),
            "feedback_bytes",
        ),
    ],  # fmt: skip
)
def test_a_record_past_a_cap_is_refused_and_names_it(record, cap):
    with pytest.raises(fold.BufferFull) as refused:
        fold.apply(None, record)
    assert refused.value.cap == cap and fold.overflow_cap(str(refused.value)) == cap
    assert isinstance(refused.value, fold.InvalidEvent)  # the shells dead-letter it as before


def test_a_reward_sum_stays_finite():
    state = None
    for i in range(3):
        slate = _slate(f"r{i}", i)
        state, _ = fold.apply(state, slate)
        for position, item in enumerate(slate.items):
            state, _ = fold.apply(
                state,
                Impression(
                    event_id=f"i{i}{position}",
                    user_id=U,
                    session_id="s1",
                    request_id=f"r{i}",
                    item=item,
                    position=position,
                    slate_size=3,
                    clicked=position == 0,
                    ts=1.0,
                ),
            )
        state, _ = fold.apply(state, Click(event_id=f"c{i}", user_id=U, session_id="s1",
                                           request_id=f"r{i}", item=1, position=0,
                                           reward=CONFIG.max_reward, ts=1.0))  # fmt: skip
    assert state is not None and state.view.cumulative_reward == 3 * CONFIG.max_reward
    assert codec.decode(codec.encode(state), SessionState) == state


def _largest_state(config: fold.FoldConfig) -> SessionState:
    """A state with every list at its cap and every value at its longest, as the caps allow
    (each held slate within the record caps, all of them within ``held_numbers``)."""
    ids = _worst_id(config)
    held = config.pending_slates + config.parked_slates
    per_slate = config.held_numbers // held  # numbers: the observation, then propensities
    assert per_slate <= config.slate_numbers
    observation = [WORST_FLOAT] * min(per_slate, config.observation_len)
    longest = [WORST_PROBABILITY] * (per_slate - len(observation))
    pending = [
        PendingSlate(request_id=ids, step=TOP, items=[], propensities=longest, policy=ids,
                     policy_version=TOP, observation=observation, served_ts=WORST_FLOAT,
                     click_expected=True, chosen_position=TOP, reward=WORST_FLOAT,
                     outcome_ts=WORST_FLOAT)
        for _ in range(config.pending_slates)
    ]  # fmt: skip
    parked = [
        SlateServed(request_id=ids, user_id=ids, session_id=ids, step=TOP, ts=WORST_FLOAT,
                    request_ts=WORST_FLOAT, items=[], scores=[WORST_FLOAT] * len(longest),
                    propensities=[], policy=ids, policy_version=TOP, observation=observation)
        for _ in range(config.parked_slates)
    ]  # fmt: skip
    assert sum(map(fold.slate_numbers, [*pending, *parked])) <= config.held_numbers
    # A buffered record is bounded by its encoded size alone: one of exactly that size.
    feedback = Impression(event_id="", user_id=U, session_id="s", request_id="r", item=TOP,
                          position=TOP, slate_size=TOP, clicked=False, ts=WORST_FLOAT)  # fmt: skip
    pad = config.feedback_bytes - len(codec.encode(feedback))
    feedback = msgspec.structs.replace(feedback, event_id="x" * pad)
    assert len(codec.encode(feedback)) == config.feedback_bytes
    view = UserView(observation=[WORST_FLOAT] * config.observation_len,
                    history=[TOP] * config.history_len,
                    history_rewards=[WORST_FLOAT] * config.history_len, step=TOP,
                    cumulative_reward=WORST_FLOAT)  # fmt: skip
    return SessionState(
        user_id=ids, session_id=ids, view=view, frontier=view, pending=pending,
        early_feedback=[feedback] * config.early_feedback, parked=parked,
        done_requests=[ids] * config.done_requests, past_sessions=[ids] * config.past_sessions,
        ended=False, last_event_ts=WORST_FLOAT,
    )  # fmt: skip


def test_the_largest_state_the_caps_allow_encodes_within_max_state_bytes():
    size = len(codec.encode(_largest_state(CONFIG)))
    assert size <= CONFIG.max_state_bytes
    assert size > 0.9 * CONFIG.max_state_bytes  # the bound is the worst case, not a guess


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pending=st.integers(1, 40), parked=st.integers(0, 40), held=st.integers(64, 4096),
    early=st.integers(0, 200), fb_bytes=st.integers(240, 2000), id_chars=st.integers(1, 200),
    observation=st.integers(0, 300), history=st.integers(1, 50), done=st.integers(1, 300),
)  # fmt: skip
def test_for_any_caps_the_largest_state_encodes_within_max_state_bytes(
    pending, parked, held, early, fb_bytes, id_chars, observation, history, done
):
    parked = min(parked, pending)
    per_slate = max(held // (pending + parked), 2)
    config = fold.FoldConfig(
        pending_slates=pending, parked_slates=parked, held_numbers=per_slate * (pending + parked),
        slate_numbers=per_slate, early_feedback=early, id_chars=id_chars, history_len=history,
        observation_len=observation, done_requests=done,
        feedback_bytes=fb_bytes,
    )  # fmt: skip
    assert len(codec.encode(_largest_state(config))) <= config.max_state_bytes


_ids = st.text(st.characters(codec="utf-8"), max_size=60)


@st.composite
def _hostile(draw):
    """Slates and feedback of one user with ids, sizes and values drawn to be hostile."""
    session = draw(st.sampled_from(["s1", "s2", "s3", draw(_ids)]))
    if draw(st.booleans()):
        candidates = draw(st.integers(0, 800))
        return SlateServed(
            request_id=draw(st.sampled_from(["r0", "r1", "r2", "r3"]) | _ids), user_id=U,
            session_id=session, step=draw(st.integers(0, 5)), ts=1.0, request_ts=1.0,
            items=[1, 2, 3], scores=[WORST_FLOAT] * 3, propensities=[0.5] * 3,
            policy=draw(_ids), policy_version=draw(st.integers(0, TOP)),
            candidates=[TOP - i for i in range(candidates)],
            observation=[WORST_FLOAT] * draw(st.integers(0, 300)),
        )  # fmt: skip
    return Impression(event_id=draw(_ids), user_id=U, session_id=session,
                      request_id=draw(st.sampled_from(["r0", "r1", "r2", "r3"]) | _ids),
                      item=draw(st.integers(0, TOP)), position=draw(st.integers(0, 3)),
                      slate_size=3, clicked=draw(st.booleans()), ts=1.0)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_hostile(), max_size=60))
def test_any_hostile_stream_keeps_every_state_within_max_state_bytes(records):
    small = fold.FoldConfig(
        pending_slates=6, parked_slates=3, held_numbers=1200, slate_numbers=600,
        early_feedback=8, observation_len=100, id_chars=20, done_requests=10,
    )  # fmt: skip
    sizes, rejects = _fold(records, small)
    assert max(sizes, default=0) <= small.max_state_bytes
    assert all(fold.overflow_cap(r) is not None or "not in slate" in r for r in rejects)
