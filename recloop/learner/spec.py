"""Rebuilding an algorithm's config from its manifest.

What an algorithm knows about the world it learns in is ``recloop.core.spec.WorldSpec``: the
wiring builds one from a producer_sim preset and hands it to ``registry.make_agent``; nothing
else about the simulator leaks into the learner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a frozen config dataclass from its ``dataclasses.asdict`` form (JSON turns
    tuples into lists; unknown keys are an error so a mismatched manifest is caught)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(data) - known)
    if bad:
        raise ValueError(f"{cls.__module__}.{cls.__name__}: unknown config field(s) {bad}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
