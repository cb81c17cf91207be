"""``recloop bench decode``: what decoding costs per record and per kB, for every record type.

For each type of ``events.ALL_RECORD_TYPES`` it builds three records from the contract
itself (``msgspec.inspect``, so the bounds of ``recloop.core.events`` are read, not copied):

- ``typical``: lists the size an interest-evolution session sends (``TYPICAL_LENGTHS``),
  ids of tens of characters, small numbers, an item chunk of ``TYPICAL_CHUNK_BYTES`` (the
  rows the simulator publishes per ``ItemChunk``);
- ``largest``: the largest record the contract accepts under ``MAX_RECORD_BYTES``: every
  field filled in declaration order, each list to its ``max_length`` or until the byte
  budget is spent, each element as large as the bounds allow (ids at their maximum length,
  integers at their upper bound, bytes to their ``max_length``), floats such as a model
  writes (``0.123456789``);
- ``largest-slow-floats``: ``largest`` with every float written as the shortest form
  msgspec parses slowest (``1e308``; a probability ``4.9e-324``): the worst case per kB.

Each record must decode (``codec.decode``), or the bench stops: a "largest" record the
codec refuses is not the largest accepted one. The time is the median of ``runs`` runs of
``n`` decodes (``n`` sized so one run takes about ``seconds``); the raw baseline, timed the
same way in the same run, is ``msgspec.json.decode`` of the same bytes into untyped Python
objects, and the ratio is codec over raw. The last line printed is one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi

from recloop.core import codec, events
from recloop.core.catalogue import chunk_rows
from recloop.core.dlq import MAX_RECORD_BYTES

VARIANTS = ("typical", "largest", "largest-slow-floats")
TYPICAL_LENGTHS: dict[str, int] = {
    "candidates": 10, "observation": 20, "items": 3, "scores": 3,
    "propensities": 3, "slate": 3, "next_slate": 3, "next_candidates": 10,
    "history": 10, "history_rewards": 10, "pending": 2,
    "early_feedback": 2, "parked": 1, "done_requests": 16, "past_sessions": 4,
    "impressed_positions": 3, "metrics": 4, "policy_steps": 2,
}  # fmt: skip
"""List lengths of a typical interest-evolution record, by field name (others: 3); a list
of lists has rows of ``TYPICAL_ROW`` elements."""
TYPICAL_ROW = 20
TYPICAL_CHUNK_BYTES = chunk_rows(TYPICAL_ROW) * TYPICAL_ROW * 4
DEFAULT_ID_CHARS = 256
"""The length of a string the contract leaves unbounded (``events.MAX_ID_CHARS`` when it
exists): such a string is an id, and the bench does not pad ids to fill a record."""
_FAST_FLOAT = 0.123456789
_SLOW_FLOAT, _SLOW_PROBABILITY = 1e308, 5e-324


@dataclass(frozen=True)
class DecodeBenchConfig:
    """What to measure."""

    seconds: float = 0.2
    """Aim for one run of ``n`` decodes to take about this long."""
    runs: int = 3
    """Runs per figure; the median counts."""
    types: tuple[str, ...] = ()
    """Record type names to measure (empty: all of ``events.ALL_RECORD_TYPES``)."""
    variants: tuple[str, ...] = VARIANTS


@dataclass(frozen=True)
class DecodeFigure:
    """One record's figures: microseconds per record and per kB (1,000 bytes)."""

    record_type: str
    variant: str
    bytes: int
    n: int
    us_per_record: float
    us_per_kb: float
    raw_us_per_kb: float
    ratio: float


# -- building records from the contract ---------------------------------------------------


class _Builder:
    """Builds JSON-ready values for ``msgspec.inspect`` types (see the module docstring)."""

    def __init__(self, variant: str) -> None:
        self.largest = variant != "typical"
        self.slow = variant == "largest-slow-floats"
        self.id_chars = int(getattr(events, "MAX_ID_CHARS", DEFAULT_ID_CHARS))

    def value(self, t: mi.Type, budget: int, name: str = "") -> Any:
        if isinstance(t, mi.StructType):
            return self.struct(t, budget)
        if isinstance(t, mi.ListType):
            return self.sequence(t, budget, name)
        if isinstance(t, mi.DictType):
            return self.mapping(t, budget, name)
        if isinstance(t, mi.UnionType):
            chosen = [m for m in t.types if not isinstance(m, mi.NoneType)]
            return self.value(chosen[0], budget, name) if chosen else None
        if isinstance(t, mi.StrType) and t.pattern is not None:
            return self.patterned(t.pattern)
        if isinstance(t, mi.BytesType):
            cap = t.max_length if t.max_length is not None else MAX_RECORD_BYTES
            n = min(cap, max(0, (budget - 4) * 3 // 4)) if self.largest else TYPICAL_CHUNK_BYTES
            return bytes(max(min(n, cap), t.min_length or 0))
        if isinstance(t, mi.StrType):
            cap = t.max_length if t.max_length is not None else self.id_chars
            n = min(cap, max(1, budget - 2)) if self.largest else min(cap, 24)
            return "x" * max(n, t.min_length or 0)
        if isinstance(t, mi.BoolType):
            return True
        if isinstance(t, mi.IntType):
            return self.integer(t)
        if isinstance(t, mi.FloatType):
            return self.number(t)
        if isinstance(t, mi.NoneType):
            return None
        raise TypeError(f"the decode bench has no value for {t!r}")

    @staticmethod
    def patterned(pattern: str) -> str:
        """A string the contract's ``pattern`` accepts: a sha256 digest (the only patterned
        field, ``CatalogueAnnounced.sha256``); another pattern stops the bench."""
        value = hashlib.sha256(b"recloop").hexdigest()
        if re.search(pattern, value) is None:
            raise TypeError(f"the decode bench has no value for the pattern {pattern!r}")
        return value

    def integer(self, t: mi.IntType) -> int:
        low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else 0)
        if not self.largest:
            return max(low, 1)
        high = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else 2**63 - 1)
        return int(high)

    def number(self, t: mi.FloatType) -> float:
        probability = t.le is not None and t.le <= 1.0
        if self.slow:
            return _SLOW_PROBABILITY if probability else _SLOW_FLOAT
        return _FAST_FLOAT

    def struct(self, t: mi.StructType, budget: int) -> dict[str, Any]:
        """Every field at its smallest, then each grown in turn within what is left."""
        small = _Builder("typical")
        out: dict[str, Any] = {}
        if t.tag_field is not None:
            out[t.tag_field] = t.tag
        fields = [f for f in t.fields if f.encode_name != "v"]
        if not self.largest:
            out.update({f.encode_name: self.value(f.type, budget, f.name) for f in fields})
            return out
        for f in fields:
            out[f.encode_name] = small.minimal(f.type)
        for f in fields:
            rest = budget - _size(out) + _size(out[f.encode_name])
            out[f.encode_name] = self.value(f.type, rest, f.name)
        return out

    def minimal(self, t: mi.Type) -> Any:
        if isinstance(t, mi.ListType):
            return [self.value(t.item_type, 0)] * (t.min_length or 0)
        if isinstance(t, mi.DictType):
            return {}
        return self.value(t, 0)

    def sequence(self, t: mi.ListType, budget: int, name: str) -> list[Any]:
        cap = t.max_length if t.max_length is not None else 100_000
        if not self.largest:
            n = TYPICAL_LENGTHS.get(name, TYPICAL_ROW if name == "row" else 3)
            return [self.value(t.item_type, budget, "row") for _ in range(min(n, cap))]
        item = self.value(t.item_type, max(0, budget - 2), "row")
        unit = _size(item) + 1
        n = min(cap, max(0, (budget - 2) // unit))
        return [item] * max(n, t.min_length or 0)

    def mapping(self, t: mi.DictType, budget: int, name: str) -> dict[str, Any]:
        cap = t.max_length if t.max_length is not None else 1_000
        value = self.value(t.value_type, 64)
        if not self.largest:
            return {f"key-{i}": value for i in range(min(cap, TYPICAL_LENGTHS.get(name, 3)))}
        key_chars = 24
        unit = key_chars + 4 + _size(value)
        n = min(cap, max(0, (budget - 2) // unit))
        return {f"k{i:0{key_chars - 1}d}": value for i in range(n)}


def _size(value: Any) -> int:
    return len(msgspec.json.encode(value))


def build_record(record_type: type[events.Record], variant: str) -> bytes:
    """The encoded ``variant`` record of ``record_type``; it decodes, or this raises."""
    builder = _Builder(variant)
    info = mi.type_info(record_type)
    assert isinstance(info, mi.StructType)
    data = msgspec.json.encode(builder.value(info, MAX_RECORD_BYTES - 64))
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"{record_type.__name__} {variant}: {len(data):,} B is over the limit")
    codec.decode(data, record_type)  # RecordDecodeError: the contract refuses its own largest
    return data


# -- timing ----------------------------------------------------------------------------------


def _median_seconds(fn: Callable[[], Any], n: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def measure(
    record_type: type[events.Record], variant: str, config: DecodeBenchConfig
) -> DecodeFigure:
    """The figures of one record (codec and raw baseline in the same run)."""
    data = build_record(record_type, variant)

    def typed() -> Any:
        return codec.decode(data, record_type)

    def raw() -> Any:
        return msgspec.json.decode(data)

    t0 = time.perf_counter()
    typed()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, min(1_000_000, int(config.seconds / once)))
    codec_s = _median_seconds(typed, n, config.runs)
    raw_s = _median_seconds(raw, n, config.runs)
    kb = len(data) / 1000
    return DecodeFigure(record_type.__name__, variant, len(data), n, round(codec_s * 1e6, 3),
                        round(codec_s * 1e6 / kb, 3), round(raw_s * 1e6 / kb, 3),
                        round(codec_s / max(raw_s, 1e-12), 3))  # fmt: skip


def run(config: DecodeBenchConfig, echo: Callable[[str], None] = print) -> list[DecodeFigure]:
    """Measure every type and variant asked for; print a table and end with one JSON line."""
    by_name = {t.__name__: t for t in events.ALL_RECORD_TYPES}
    unknown = [t for t in config.types if t not in by_name]
    if unknown:
        raise ValueError(f"unknown record type(s) {unknown}; known: {', '.join(by_name)}")
    chosen = [by_name[t] for t in config.types] if config.types else list(by_name.values())
    echo(f"decode cost per record and per kB (median of {config.runs} runs; raw = "
         f"msgspec.json.decode untyped; records up to {MAX_RECORD_BYTES:,} B)")  # fmt: skip
    echo(f"{'type':<16} {'variant':<20} {'bytes':>9} {'us/record':>11} {'us/kB':>9} "
         f"{'raw us/kB':>10} {'ratio':>7}")  # fmt: skip
    figures = []
    for record_type in chosen:
        for variant in config.variants:
            f = measure(record_type, variant, config)
            figures.append(f)
            echo(f"{f.record_type:<16} {f.variant:<20} {f.bytes:>9,} {f.us_per_record:>11.1f} "
                 f"{f.us_per_kb:>9.2f} {f.raw_us_per_kb:>10.2f} {f.ratio:>7.2f}")  # fmt: skip
    echo(json.dumps({"bench": "decode", "max_record_bytes": MAX_RECORD_BYTES,
                     "runs": config.runs, "figures": [asdict(f) for f in figures]},
                    sort_keys=True))  # fmt: skip
    return figures
