"""The wire format, in one place: compact JSON via msgspec, with strict decoding.

Everything that turns a record into bytes or bytes into a record goes through here, so a
change of format touches one module. Decoding is strict: bad bytes, a missing field, a
wrong type, a non-finite float where a finite one is required, or an unsupported schema
version all raise ``RecordDecodeError`` with a message that names the problem.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import lru_cache
from typing import Any, TypeVar, cast

import msgspec

from recloop.core.events import Record

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


@lru_cache(maxsize=64)
def _decoder(record_type: Any) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(record_type)


def _type_name(record_type: Any) -> str:
    # A record's wire name is its tag (a projection such as SlateAnswer reads a SlateServed).
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

    def decode_one(data: bytes | bytearray | memoryview | None) -> R:
        if data is None:
            raise RecordDecodeError(expected, "empty message (null value)")
        try:
            record = decode_json(data)
        except msgspec.ValidationError as exc:
            raise RecordDecodeError(expected, _explain(str(exc))) from None
        except msgspec.DecodeError as exc:
            raise RecordDecodeError(expected, f"malformed JSON: {exc}") from None
        if record.v not in record.SUPPORTED_VERSIONS:
            raise RecordDecodeError(
                type(record).__name__,
                f"unsupported schema version {record.v} "
                f"(this build reads {sorted(record.SUPPORTED_VERSIONS)})",
            )
        return record  # type: ignore[no-any-return]

    return decode_one


def _explain(message: str) -> str:
    # msgspec reports bounds violations for our Finite type as a range error; say what it means.
    if any(m in message for m in ("Expected `float` >=", "Expected `float` <=", "out of range")):
        return f"non-finite or out-of-range float ({message})"
    return message
