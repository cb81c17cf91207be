"""The wire format, in one place: compact JSON via msgspec, with strict decoding.

Everything that turns a record into bytes or bytes into a record goes through here, so a
change of format touches one module. Decoding is strict: bad bytes, a missing field, a
wrong type, a non-finite float where a finite one is required, or an unsupported schema
version all raise ``RecordDecodeError`` with a message that names the problem.

Decoding cannot raise anything else, whatever the bytes (the consumers' dead-lettering
rests on it):

- a value over ``recloop.core.dlq.MAX_RECORD_BYTES`` is refused before it is parsed;
- ``RecursionError`` (nesting deeper than Python's stack allows, in an unknown field that
  msgspec skips recursively), ``MemoryError`` and any other exception of the parser become
  ``RecordDecodeError`` too;
- sizes are bounded by the contract (``recloop.core.events``), so a value decodes into at
  most what its limits allow.

Decoding is also fast for any bytes. msgspec parses floats at the edges of the double
range (exponents past about ±300, subnormals) some 300 times slower than others, about
1.4 ms per kB of ``1e308,1e308,...``; a large value (over ``_SLOW_FLOAT_SCAN_BYTES``) that
holds such a number is therefore parsed by the standard library's ``json`` and then
validated by ``msgspec.convert`` against the same type, which accepts and refuses exactly
what the JSON decoder does for every value a recloop producer writes (NaN and Infinity
are refused by the parser in both paths).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable
from functools import lru_cache
from typing import Any, TypeVar, cast

import msgspec

from recloop.core.dlq import MAX_RECORD_BYTES
from recloop.core.events import V1_WITH_FEATURE_ROWS, Record

R = TypeVar("R")

_encoder = msgspec.json.Encoder()


class RecordDecodeError(ValueError):
    """Raised when bytes cannot be decoded into the expected record type."""

    def __init__(self, expected: str, reason: str) -> None:
        super().__init__(f"cannot decode {expected}: {reason}")
        self.expected = expected
        self.reason = reason


def encode(record: Record) -> bytes:
    """Encode one record to its wire bytes."""
    return _encoder.encode(record)


def encode_many(records: list[Record]) -> list[bytes]:
    """Encode a batch of records (one message each)."""
    enc = _encoder.encode
    return [enc(r) for r in records]


_SLOW_FLOAT_SCAN_BYTES = 16_384
"""Values up to this size are always parsed by msgspec: a few thousand slow floats cost
tens of milliseconds at most."""
_SLOW_FLOAT = re.compile(rb"[eE]\+?0*[1-9][0-9]{2,}|[eE]\+?0*(?:2[3-9]|[3-9][0-9])|[eE]-0*[1-9][0-9]{2,}")
"""A number msgspec may parse slowly: an exponent of 23 or more, or of -100 or less."""


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _stdlib_parse(data: bytes | bytearray | memoryview) -> Any:
    return json.loads(bytes(data), parse_constant=_refuse_constant)


@lru_cache(maxsize=64)
def _decoder(record_type: Any) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(record_type)


def _type_name(record_type: Any) -> str:
    # A record's wire name is its tag (a projection of a record would read its tag's type).
    config = getattr(record_type, "__struct_config__", None)
    if config is not None and isinstance(config.tag, str):
        return config.tag
    return getattr(record_type, "__name__", None) or str(record_type).replace("recloop.core.events.", "")


def decode(data: bytes | bytearray | memoryview | None, record_type: type[R] | Any) -> R:
    """Decode ``data`` as ``record_type`` (a Record class or a union of them).

    Raises ``RecordDecodeError`` naming the problem; never returns a partial record.
    """
    return decoder_for(cast(Hashable, record_type))(data)


@lru_cache(maxsize=64)
def decoder_for(
    record_type: type[R] | Any,
) -> Callable[[bytes | bytearray | memoryview | None], R]:
    """``decode`` with ``record_type`` bound: for loops that decode one type many times."""
    decode_json = _decoder(cast(Hashable, record_type)).decode
    expected = _type_name(record_type)

    def parse(data: bytes | bytearray | memoryview) -> Any:
        if len(data) > _SLOW_FLOAT_SCAN_BYTES and _SLOW_FLOAT.search(data):
            return msgspec.convert(_stdlib_parse(data), record_type)
        return decode_json(data)

    def decode_one(data: bytes | bytearray | memoryview | None) -> R:
        if data is None:
            raise RecordDecodeError(expected, "empty message (null value)")
        if len(data) > MAX_RECORD_BYTES:
            raise RecordDecodeError(
                expected, f"record of {len(data):,} bytes is over MAX_RECORD_BYTES "
                f"({MAX_RECORD_BYTES:,}); not decoded",
            )  # fmt: skip
        try:
            record = parse(data)
        except msgspec.ValidationError as exc:
            raise RecordDecodeError(expected, _explain(str(exc))) from None
        except (msgspec.DecodeError, ValueError) as exc:  # json's errors are ValueErrors
            raise RecordDecodeError(expected, f"malformed JSON: {_short(exc)}") from None
        except RecursionError:
            raise RecordDecodeError(expected, "nested too deeply to decode") from None
        except MemoryError:
            raise RecordDecodeError(expected, "too large to decode in memory") from None
        except Exception as exc:  # noqa: BLE001 - the contract: nothing but RecordDecodeError
            raise RecordDecodeError(
                expected, f"cannot be parsed ({type(exc).__name__}: {_short(exc)})"
            ) from None
        if record.v not in record.SUPPORTED_VERSIONS:
            if record.v == V1_WITH_FEATURE_ROWS:
                raise RecordDecodeError(
                    type(record).__name__,
                    f"schema version 1 ({type(record).__name__} with candidate feature rows, "
                    f"before the item catalogue) is no longer read; this build reads "
                    f"{sorted(record.SUPPORTED_VERSIONS)}, with item ids only (docs/catalogue.md)",
                )
            raise RecordDecodeError(
                type(record).__name__,
                f"unsupported schema version {record.v} "
                f"(this build reads {sorted(record.SUPPORTED_VERSIONS)})",
            )
        return record  # type: ignore[return-value]

    return decode_one


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _explain(message: str) -> str:
    # msgspec reports bounds violations for our Finite type as a range error; say what it means.
    if any(m in message for m in ("Expected `float` >=", "Expected `float` <=", "out of range")):
        return f"non-finite or out-of-range float ({message})"
    return message
