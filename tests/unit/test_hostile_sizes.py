"""Hostile sizes cannot build an oversized state or make serving allocate by item id.

Issue 12, finding 3: three 406 kB slates built a session state over the broker's record
limit, and a ``SessionState`` with ``history=[10**15]`` made the popularity fallback allocate
7 PiB (the compacted ``session.state`` topic replays it after every restart).
"""

from __future__ import annotations

import numpy as np
import pytest

from recloop.core import codec
from recloop.core.events import Impression, RecRequest, SessionState, SlateServed, UserView
from recloop.serving.fallback import PopularityCounts
from recloop.serving.host import PolicyHost
from recloop.serving.server import ServeConfig, SlateServer
from recloop.serving.session_cache import SessionCache
from recloop.serving.split import TrafficSplit
from recloop.streams import fold
from recloop.streams.batch import BatchFolder, RawRecord

RECORD_LIMIT = 1_000_000  # aiokafka's max_request_size, under the broker's 1,048,588
U = "u1"
WORST_FLOAT = -2.2250738585072014e-308  # the longest float JSON has: 24 characters
WORST_ID = "\x01" * 64  # 64 characters, each escaped to 6 bytes


def _slate(
    rid: str,
    step: int,
    session: str = "s1",
    rows: int = 0,
    cols: int = 20,
    value: float = 0.123456789,
    **fields,
) -> SlateServed:
    return SlateServed(
        request_id=rid, user_id=U, session_id=session, step=step, ts=100.0 + step,
        request_ts=100.0 + step, items=[1, 2, 3], scores=[0.0] * 3, propensities=[0.5] * 3,
        policy="p", policy_version=1, candidates=list(range(rows)),
        candidate_features=[[value] * cols for _ in range(rows)], **fields,
    )  # fmt: skip


def _fold(records: list[SlateServed | Impression], config: fold.FoldConfig = fold.DEFAULT):
    """Fold one record per batch, as a worker would, keeping every state it encodes."""
    folder = BatchFolder("slates", "feedback", config)
    table: dict[bytes, bytes] = {}
    sizes, rejects = [], []
    for i, record in enumerate(records):
        topic = "slates" if isinstance(record, SlateServed) else "feedback"
        raw = RawRecord(topic, 0, i, U.encode(), codec.encode(record))
        result = folder.fold([raw], table.get)
        rejects += [reason for _, reason in result.rejects]
        for key, (_, encoded, _) in result.states.items():
            table[key] = encoded
            sizes.append(len(encoded))
    return sizes, rejects


def test_three_406_kB_slates_cannot_build_a_state_over_the_record_limit():
    slates = [_slate(f"r{i}", i, rows=1650) for i in range(3)]
    assert all(400_000 < len(codec.encode(s)) < 410_000 for s in slates)
    sizes, rejects = _fold(slates)
    assert max(sizes, default=0) < RECORD_LIMIT
    assert len(rejects) == 3
    assert all("slate_bytes=65536" in reason for reason in rejects)


def test_held_slates_of_the_worst_content_stay_under_the_state_bound():
    config = fold.DEFAULT
    # Slates just under slate_bytes, every float and id at its longest: pending and parked.
    big = dict(rows=110, value=WORST_FLOAT, observation=[WORST_FLOAT] * 20)
    pending = [_slate(f"{i:02d}" + WORST_ID[2:], i, **big) for i in range(8)]
    parked = [_slate(f"q{i:02d}" + WORST_ID[3:], i, session="s2", **big) for i in range(8)]
    assert fold.held_bytes(pending[0]) <= config.slate_bytes
    sizes, rejects = _fold([*pending, *parked])
    assert rejects and all("held_slates_bytes" in reason for reason in rejects)
    assert max(sizes) <= config.max_state_bytes < RECORD_LIMIT


def test_buffered_feedback_is_bounded_in_size():
    config = fold.DEFAULT

    # Feedback of a slate not yet seen waits in the buffer, if it is small enough.
    def impression(i: int, pad: int) -> Impression:
        return Impression(event_id=f"e{i}-" + "x" * pad, user_id=U, session_id="s1",
                          request_id=f"r{i}", item=10**18, position=0, slate_size=3, clicked=False,
                          ts=WORST_FLOAT)  # fmt: skip

    fits = impression(0, 0)
    pad = config.feedback_bytes - len(codec.encode(fits))
    records = [impression(i, pad - 2 * len(str(i)) + 2) for i in range(config.early_feedback)]
    assert max(len(codec.encode(r)) for r in records) == config.feedback_bytes
    huge = impression(-1, 900_000)
    sizes, rejects = _fold([*records[:-1], huge, records[-1]])
    assert len(rejects) == 1 and "feedback_bytes=512" in rejects[0]
    assert max(sizes) <= config.max_state_bytes < RECORD_LIMIT


@pytest.mark.parametrize(
    "slate, reason",
    [
        (_slate("r" * 65, 0), "longer than id_chars=64"),
        (_slate("r0", 0, session="s" * 900_000), "longer than id_chars=64"),
        (
            SlateServed(
                request_id="r0",
                user_id=U,
                session_id="s1",
                step=0,
                ts=1.0,
                request_ts=1.0,
                items=[10**30],
                scores=[0.0],
                propensities=[1.0],
                policy="p",
                policy_version=1,
            ),
            "does not fit in 64 bits",
        ),  # fmt: skip
    ],
)
def test_a_slate_with_hostile_ids_is_refused(slate, reason):
    with pytest.raises(fold.InvalidEvent, match=reason):
        fold.apply(None, slate)


def _hostile_state(history: list[int]) -> SessionState:
    return SessionState(user_id=U, session_id="s1", view=UserView(history=history))


def test_a_state_with_an_item_id_outside_the_catalogue_is_refused_not_allocated():
    counts = PopularityCounts(n_items=100)
    cache = SessionCache(counts)
    cache.update(_hostile_state([3]))
    assert "outside the catalogue [0, 100)" in (cache.update(_hostile_state([3, 10**15])) or "")
    assert cache.refused == 1 and counts.total == 1
    assert cache.view(U, "s1") == UserView(history=[3])  # the previous state is kept
    # Served after it, as after a restart that replayed the compacted topic.
    config = ServeConfig(split=TrafficSplit.parse(["popularity=1"]), fallback="popularity",
                         n_items=100)  # fmt: skip
    server = SlateServer(config, PolicyHost([]), cache)
    request = RecRequest(request_id="q", user_id=U, session_id="s1", step=1, ts=1.0, k=2,
                         candidates=[3, 4, 5])  # fmt: skip
    assert server.serve_batch([request])[0].items[0] == 3


def test_popularity_counts_never_size_their_array_by_an_id():
    counts = PopularityCounts()  # the catalogue's size unknown
    counts.add([10**15, 10**30, -1, 7])
    assert counts.total == 1 and counts.ignored == 3
    assert counts.get(np.array([7, 10**15], np.int64)).tolist() == [1, 0]
