"""The codec: every record round-trips, and every kind of malformed input is refused clearly."""

from __future__ import annotations

import math
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recloop.core import codec, events
from recloop.core.codec import RecordDecodeError

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
prob = st.floats(min_value=0.0, max_value=1.0)
ids = st.text(min_size=1, max_size=12)
items = st.lists(st.integers(min_value=0, max_value=10**9), max_size=6)
natural = st.integers(min_value=0, max_value=10**6)
position = st.integers(min_value=0, max_value=events.MAX_SLATE - 1)
views = st.builds(
    events.UserView,
    observation=st.lists(finite, max_size=4),
    history=items,
    history_rewards=st.lists(finite, max_size=4),
    step=natural,
    cumulative_reward=finite,
)
pending = st.builds(
    events.PendingSlate,
    request_id=ids,
    step=natural,
    items=items,
    propensities=st.lists(prob, max_size=6),
    policy=ids,
    policy_version=natural,
    candidates=items,
    observation=st.lists(finite, max_size=3),
    served_ts=finite,
    impressed_positions=st.lists(position, max_size=3),
    click_expected=st.booleans(),
    chosen_position=st.none() | position,
    reward=finite,
    outcome_ts=finite,
)


NATURAL_FIELDS = {
    "step",
    "steps",
    "policy_version",
    "version",
    "clicks",
    "transitions_applied",
}


def _strategy(record_type: type) -> st.SearchStrategy:
    """A strategy for any record: field strategies by name, the rest inferred from types."""
    overrides: dict[str, st.SearchStrategy] = {
        "k": st.integers(min_value=1, max_value=50),
        "slate_size": st.integers(min_value=1, max_value=50),
        "propensities": st.lists(prob, max_size=6),
        "view": views,
        "frontier": views,
        "state": views,
        "next_state": views,
        "pending": st.lists(pending, max_size=2),
        "early_feedback": st.deferred(
            lambda: st.lists(
                st.one_of(_strategy(events.Click), _strategy(events.SessionEnd)), max_size=2
            )
        ),
        "parked": st.deferred(lambda: st.lists(_strategy(events.SlateServed), max_size=1)),
        "metrics": st.dictionaries(ids, finite, max_size=3),
        "policy_steps": st.dictionaries(ids, natural, max_size=3),
        "chosen_position": st.none() | position,
        "position": position,
        "chosen_item": st.none() | st.integers(min_value=0, max_value=10**9),
        # The catalogue's records (an ItemChunk's bytes are checked where chunks are
        # assembled, not by the decoder: any bytes round-trip).
        "first_item": st.integers(min_value=0, max_value=events.MAX_ITEM_ID),
        "n": st.integers(min_value=1, max_value=events.MAX_CATALOGUE_ITEMS),
        "dim": st.integers(min_value=0, max_value=events.MAX_FEATURE_DIM),
        "features": st.binary(max_size=256),
        "n_items": st.integers(min_value=1, max_value=events.MAX_CATALOGUE_ITEMS),
        "feature_dim": st.integers(min_value=0, max_value=events.MAX_FEATURE_DIM),
        "sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
        **{name: natural for name in NATURAL_FIELDS},
    }
    fields = {f.name: _bare(f.type) for f in msgspec.structs.fields(record_type)}
    chosen = {}
    for name, annotation in fields.items():
        if name == "v":
            continue
        if name in overrides:
            chosen[name] = overrides[name]
        elif annotation is str or annotation == "str":
            chosen[name] = ids
        elif annotation is float:
            chosen[name] = finite
        elif annotation == list[list[float]]:
            chosen[name] = st.lists(st.lists(finite, max_size=3), max_size=3)
        elif annotation == list[float]:
            chosen[name] = st.lists(finite, max_size=4)
        elif annotation == list[int]:
            chosen[name] = items
        elif annotation == list[str]:
            chosen[name] = st.lists(ids, max_size=3)
        elif annotation is bool:
            chosen[name] = st.booleans()
        elif annotation is int:
            chosen[name] = st.integers(min_value=0, max_value=10**9)
        else:
            raise AssertionError(f"no strategy for {record_type.__name__}.{name}: {annotation!r}")
    return st.builds(record_type, **chosen)


def _bare(annotation: object) -> object:
    """``annotation`` without its ``Annotated`` bounds (``list[Finite]`` -> ``list[float]``):
    the strategies above already stay within every bound of the contract."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _bare(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is list:
        return list[_bare(typing.get_args(annotation)[0])]  # type: ignore[misc]
    return annotation


@pytest.mark.parametrize("record_type", events.ALL_RECORD_TYPES, ids=lambda t: t.__name__)
def test_every_record_round_trips(record_type: type) -> None:
    @settings(max_examples=60, deadline=None)
    @given(_strategy(record_type))
    def check(record: events.Record) -> None:
        assert codec.decode(codec.encode(record), record_type) == record

    check()


def test_an_item_chunk_carries_its_float32_rows_exactly() -> None:
    import numpy as np

    from recloop.core.catalogue import ItemCatalogue, chunk_rows_of

    rows = np.array([[0.1, -2.5e-38, 3.0e38], [1.0, 0.0, -0.0]], dtype=np.float32)
    catalogue = ItemCatalogue(rows, version=3)
    (chunk,) = catalogue.chunks(ts=1.0)
    back = codec.decode(codec.encode(chunk), events.ItemChunk)
    assert back == chunk and back.features == rows.astype("<f4").tobytes()
    np.testing.assert_array_equal(chunk_rows_of(back), rows)
    announced = codec.decode(codec.encode(catalogue.announcement(ts=1.0)),
                             events.CatalogueAnnounced)  # fmt: skip
    assert (announced.version, announced.n_items, announced.feature_dim, announced.sha256) == (
        3, 2, 3, catalogue.sha256,
    )  # fmt: skip


def _v1(record: events.Record, **v1_fields: object) -> bytes:
    """``record`` as a schema-1 producer wrote it: ``v`` 1 and the fields v2 dropped."""
    obj = msgspec.json.decode(codec.encode(record))
    obj.update(v=1, **v1_fields)
    return msgspec.json.encode(obj)


_ROWS = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
_V1_WITH_ROWS = {
    events.RecRequest: {"candidate_features": _ROWS},
    events.SlateServed: {"candidate_features": _ROWS},
    events.SessionState: {},  # its pending slates carried the rows
    events.Transition: {"candidate_features": _ROWS, "next_candidate_features": _ROWS},
}


@pytest.mark.parametrize("record_type", list(_V1_WITH_ROWS), ids=lambda t: t.__name__)
def test_a_v1_record_with_feature_rows_is_refused_saying_so(record_type: type) -> None:
    from tests.fixtures import example_events

    (record,) = [r for r in example_events() if type(r) is record_type]
    data = _v1(record, **_V1_WITH_ROWS[record_type])
    if record_type is events.SessionState:
        data = data.replace(
            b'"candidates":[3,9,11]',
            b'"candidates":[3,9,11],"candidate_features":[[0.1],[0.2],[0.3]]',
        )
        assert b"candidate_features" in data  # fmt: skip
    with pytest.raises(RecordDecodeError) as refused:
        codec.decode(data, record_type)
    reason = str(refused.value)
    assert f"cannot decode {record_type.__name__}: schema version 1" in reason
    assert "candidate feature rows" in reason and "no longer read" in reason
    assert codec.decode(codec.encode(record), record_type) == record  # v2 reads


@pytest.mark.parametrize("record_type", [events.Impression, events.Click, events.SessionEnd,
                                         events.EpisodeOutcome, events.PolicyPublished],
                         ids=lambda t: t.__name__)  # fmt: skip
def test_a_v1_record_whose_shape_did_not_change_still_decodes(record_type: type) -> None:
    from tests.fixtures import example_events

    (record,) = [r for r in example_events() if type(r) is record_type]
    old = codec.decode(_v1(record), record_type)
    assert old.v == 1 and msgspec.structs.replace(old, v=events.SCHEMA_VERSION) == record


def test_feedback_union_decodes_each_member_by_its_tag() -> None:
    click = events.Click(
        event_id="e",
        user_id="u",
        session_id="s",
        request_id="r",
        item=3,
        position=1,
        reward=4.0,
        ts=1.0,
    )
    end = events.SessionEnd(event_id="f", user_id="u", session_id="s", steps=2, ts=2.0)
    assert codec.decode(codec.encode(click), events.Feedback) == click
    assert codec.decode(codec.encode(end), events.Feedback) == end


def _valid_click() -> dict:
    return msgspec.json.decode(
        codec.encode(
            events.Click(
                event_id="e",
                user_id="u",
                session_id="s",
                request_id="r",
                item=3,
                position=1,
                reward=4.0,
                ts=1.0,
            )
        )
    )


@pytest.mark.parametrize(
    ("mutate", "expected_in_message"),
    [
        (lambda d: d.pop("reward"), "reward"),
        (lambda d: d.update(item="three"), "item"),
        (lambda d: d.update(position=-1), "position"),
        (lambda d: d.update(reward=1e400), "non-finite"),
        (lambda d: d.update(v=99), "schema version 99"),
        (lambda d: d.update(type="NoSuchEvent"), "NoSuchEvent"),
    ],
    ids=["missing-field", "wrong-type", "negative-position", "infinite", "version", "unknown-tag"],
)
def test_malformed_record_raises_clear_error(mutate, expected_in_message: str) -> None:
    data = _valid_click()
    mutate(data)
    raw = msgspec.json.encode(data)
    if expected_in_message == "non-finite":
        # msgspec would encode inf as null; write the out-of-range literal into the bytes.
        raw = msgspec.json.encode({**data, "reward": 0}).replace(b'"reward":0', b'"reward":1e400')
    with pytest.raises(RecordDecodeError) as info:
        codec.decode(raw, events.Feedback)
    assert expected_in_message in str(info.value)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"null"])
def test_non_finite_reward_is_refused(literal: bytes) -> None:
    # On the JSON wire msgspec's parser refuses these by itself (NaN and Infinity are not
    # JSON, 1e999 overflows), with or without ``Finite``: this holds the codec to its promise.
    # The guard's own job is tested below, on the paths that can carry a non-finite float.
    raw = msgspec.json.encode({**_valid_click(), "reward": 0}).replace(
        b'"reward":0', b'"reward":' + literal
    )
    with pytest.raises(RecordDecodeError):
        codec.decode(raw, events.Click)


_nasty = st.sampled_from([b"[", b'{"x":', b"1e308,", b"5e-324,", b'"', b"\\u0000", b"\xff"])


@given(
    st.one_of(
        st.binary(max_size=64),
        # Large and deep: a short piece repeated up to a million bytes (deeper than any
        # recursion limit, over MAX_RECORD_BYTES), after a valid prefix or on its own.
        st.tuples(
            st.sampled_from([b"", b'{"type":"Click","v":1,"x":']),
            _nasty,
            st.integers(min_value=1, max_value=1_000_000 // 6),
        ).map(lambda t: t[0] + t[1] * t[2]),
    )
)
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_never_escape_as_another_error(data: bytes) -> None:
    """Any bytes, up to the broker's limit: a record or ``RecordDecodeError``, nothing else
    (the fuzz tier, ``test_fuzz_codec``, goes much further)."""
    try:
        codec.decode(data, events.Feedback)
    except RecordDecodeError as exc:
        assert "cannot decode" in str(exc)


def test_a_deep_unknown_field_is_a_record_decode_error() -> None:
    """The issue's 2.1 kB poison record: a 996-deep array in a field no record has."""
    data = b'{"type":"Click","v":1,"junk":' + b"[" * 996 + b"]" * 996 + b"}"
    with pytest.raises(RecordDecodeError, match="cannot decode"):
        codec.decode(data, events.Feedback)


def test_a_value_over_max_record_bytes_is_refused_unparsed() -> None:
    from recloop.core.dlq import MAX_RECORD_BYTES

    data = b'{"type":"Click","v":1,"pad":"' + b"p" * MAX_RECORD_BYTES + b'"}'
    with pytest.raises(RecordDecodeError, match="over MAX_RECORD_BYTES"):
        codec.decode(data, events.Feedback)


def test_slow_floats_decode_fast_and_the_same() -> None:
    """A large value full of msgspec's slowest floats takes the stdlib path and decodes to
    the same record (or the same refusal) as msgspec would (how fast: ``recloop bench
    decode`` and the fuzz tier's time bound)."""
    obs = b"[" + b",".join([b"1e308", b"5e-324", b"0.5"] * 30_000) + b"]"
    data = (b'{"type":"RecRequest","v":2,"request_id":"r","user_id":"u","session_id":"s",'
            b'"step":0,"ts":1.0,"k":1,"observation":' + obs + b"}")  # fmt: skip
    with pytest.raises(RecordDecodeError, match="observation|length"):
        codec.decode(data, events.RecRequest)  # 90,000 > MAX_OBSERVATION
    ok = data.replace(obs, b"[" + b",".join([b"1e308", b"5e-324", b"0.5"] * 300) + b"]")
    ok = ok.replace(b'"k":1,', b'"k":1,"candidates":[1],' + b" " * 20_000)
    record = codec.decode(ok, events.RecRequest)
    assert record == msgspec.json.decode(ok, type=events.RecRequest)
    assert record.observation[:3] == [1e308, 5e-324, 0.5]


def test_empty_value_is_refused() -> None:
    with pytest.raises(RecordDecodeError, match="empty"):
        codec.decode(None, events.RecRequest)


def _example(info: msgspec.inspect.Type) -> object:
    """The builtins of one valid value of ``info``: every list and dict holds one element."""
    mi = msgspec.inspect
    if isinstance(info, mi.StructType):
        obj = {f.encode_name: _example(f.type) for f in info.fields}
        if info.tag_field is not None:
            obj[info.tag_field] = info.tag
        return obj
    if isinstance(info, mi.UnionType):
        return _example(next(t for t in info.types if not isinstance(t, mi.NoneType)))
    if isinstance(info, mi.ListType):
        return [_example(info.item_type)]
    if isinstance(info, mi.DictType):
        return {"key": _example(info.value_type)}
    if isinstance(info, mi.FloatType):
        return 0.5
    if isinstance(info, mi.IntType):
        return max(info.ge or 0, 1)
    if isinstance(info, mi.StrType):
        return "0" * 64 if info.pattern else "x"  # the one pattern: a sha256 digest
    if isinstance(info, mi.BytesType):
        return b"\x00" * 8
    if isinstance(info, mi.BoolType):
        return True
    raise AssertionError(f"no example for {info!r}")


def _float_paths(obj: object, path: tuple = ()) -> list[tuple]:
    """Paths (keys and indexes) to every float in a builtins tree."""
    if isinstance(obj, float):
        return [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _float_paths(v, (*path, k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _float_paths(v, (*path, i))]
    return []


def _replaced(obj: object, path: tuple, value: float) -> object:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, head: _replaced(obj[head], rest, value)}
    assert isinstance(obj, list)
    return [_replaced(v, rest, value) if i == head else v for i, v in enumerate(obj)]


@pytest.mark.parametrize("record_type", events.ALL_RECORD_TYPES, ids=lambda t: t.__name__)
def test_every_float_field_refuses_non_finite_values_where_the_wire_could_carry_them(
    record_type: type,
) -> None:
    """``Finite`` (and ``Probability``) on every float of every record, nested ones included.

    JSON cannot carry NaN or infinity, so the guard bites where a decoder can: a record
    validated from Python objects (``msgspec.convert``) or from MessagePack. Each float
    of a valid record is replaced in turn by NaN, +inf and -inf; each must be refused.
    """
    valid = _example(msgspec.inspect.type_info(record_type))
    assert isinstance(msgspec.convert(valid, record_type), record_type)
    paths = _float_paths(valid)
    assert paths, f"{record_type.__name__} has no float to check"
    for path in paths:
        for bad in (math.nan, math.inf, -math.inf):
            obj = _replaced(valid, path, bad)
            with pytest.raises(msgspec.ValidationError, match="Expected `float`"):
                msgspec.convert(obj, record_type)
            with pytest.raises(msgspec.ValidationError, match="Expected `float`"):
                msgspec.msgpack.decode(msgspec.msgpack.encode(obj), type=record_type)


def test_nan_in_a_list_of_finite_floats_is_refused() -> None:
    request = events.RecRequest(
        request_id="r", user_id="u", session_id="s", step=0, ts=1.0, k=3, observation=[0.5]
    )
    raw = codec.encode(request).replace(b"[0.5]", b"[NaN]")  # refused as JSON, as above
    with pytest.raises(RecordDecodeError):
        codec.decode(raw, events.RecRequest)
    assert not math.isnan(codec.decode(codec.encode(request), events.RecRequest).observation[0])
