"""A hostile session state cannot make serving allocate by an item id (issue 12, finding 3).

``session.state`` is compacted and anyone who can write to Kafka can write it: a state with
``history=[10**15]`` made the popularity fallback allocate 7.11 PiB (MemoryError, on the
session-state thread, and again after every restart). Serving refuses a state whose history
leaves the catalogue, and the counts never size their array by an id.
"""

from __future__ import annotations

import numpy as np

from recloop.core import codec
from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import RecRequest, SessionState, UserView
from recloop.serving import fallback
from recloop.serving.fallback import PopularityCounts
from recloop.serving.host import PolicyHost
from recloop.serving.server import ServeConfig, SlateServer
from recloop.serving.session_cache import SessionCache
from recloop.serving.split import TrafficSplit

U = "u1"
N_ITEMS = 100


def _state(history: list[int], session: str = "s1") -> SessionState:
    return SessionState(user_id=U, session_id=session, view=UserView(history=history))


def _server(cache: SessionCache) -> SlateServer:
    config = ServeConfig(split=TrafficSplit.parse(["popularity=1"]), fallback="popularity")
    return SlateServer(config, PolicyHost([]), cache,
                       ItemCatalogue(np.zeros((N_ITEMS, 0), np.float32)))  # fmt: skip


def _request() -> RecRequest:
    return RecRequest(request_id="q", user_id=U, session_id="s1", step=1, ts=1.0, k=2,
                      candidates=[3, 4, 5])  # fmt: skip


def test_a_state_naming_an_item_past_the_catalogue_is_refused_and_serving_goes_on():
    counts = PopularityCounts(N_ITEMS)
    cache = SessionCache(counts)
    assert cache.update(_state([3])) is None
    # As decoded off the wire: the compacted topic replays it after every restart.
    hostile = codec.decode(codec.encode(_state([3, 10**15])), SessionState)
    reason = cache.update(hostile)
    assert reason is not None and "history item 1000000000000000 is outside the catalogue" \
        " [0, 100)" in reason  # fmt: skip
    assert cache.refused == 1 and cache.last_refusal == reason
    assert counts.total == 1 and counts.ignored == 0  # nothing of the refused state counted
    assert cache.view(U, "s1") == UserView(history=[3])  # the previous state is kept
    [slate] = _server(cache).serve_batch([_request()])
    assert slate.items[0] == 3 and slate.policy == "popularity"


def test_negative_and_past_int64_ids_are_refused_too():
    cache = SessionCache(PopularityCounts(N_ITEMS))
    for bad in (-1, 2**63, 10**30):
        assert cache.update(_state([1, bad])) is not None
    assert cache.refused == 3 and len(cache) == 0


def test_without_a_known_catalogue_only_ids_past_int64_are_refused():
    cache = SessionCache(PopularityCounts())
    assert cache.update(_state([10**15])) is None  # int64: a learned policy range-checks it
    assert cache.update(_state([2**63])) is not None


def test_popularity_counts_never_size_their_array_by_an_id():
    counts = PopularityCounts()  # the catalogue's size unknown
    counts.add([10**15, 10**30, 2**63, -1, 7, fallback.UNKNOWN_CATALOGUE_ITEMS])
    assert counts.total == 1 and counts.ignored == 5
    assert counts.get(np.array([7, 10**15], np.int64)).tolist() == [1, 0]
    known = PopularityCounts(N_ITEMS)
    known.add(np.array([5, N_ITEMS, 10**15], np.int64))
    assert known.total == 1 and known.ignored == 2
    assert known.get(np.arange(N_ITEMS)).shape == (N_ITEMS,)
