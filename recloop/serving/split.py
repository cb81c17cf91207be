"""A deterministic traffic split between policies, by a hash of the user id.

A user always lands on the same policy (across requests, restarts and serving replicas), so
an A/B comparison sees whole sessions of one policy. The hash is BLAKE2b of the UTF-8 user
id, read as a number in [0, 1); the normalised shares are laid end to end on that interval
in the order given.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

_ARM_RE = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,127})(?:=([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?))?$"
)


def user_unit(user_id: str) -> float:
    """The user's fixed point in [0, 1)."""
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def parse_arm(text: str) -> tuple[str, float]:
    """``"slateq=0.5"`` -> ``("slateq", 0.5)``; a bare name gets share 1."""
    match = _ARM_RE.match(text.strip())
    if match is None:
        raise ValueError(
            f"policy {text!r} must be NAME or NAME=SHARE (e.g. slateq=0.5); a name is letters, "
            "digits, '_', '.', '-'"
        )
    share = float(match.group(2)) if match.group(2) is not None else 1.0
    return match.group(1), share


@dataclass(frozen=True)
class TrafficSplit:
    """Policies with their shares; ``arm(user_id)`` picks one deterministically."""

    arms: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("at least one policy is needed")
        names = [name for name, _ in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"policy names must be distinct, got {names}")
        # A zero share is allowed (that policy gets no users), a negative one is not.
        if any(share < 0 for _, share in self.arms) or sum(s for _, s in self.arms) <= 0:
            raise ValueError(f"shares must be >= 0 and not all 0, got {self.arms}")

    @classmethod
    def parse(cls, texts: Sequence[str]) -> TrafficSplit:
        return cls(tuple(parse_arm(t) for t in texts))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.arms]

    def fractions(self) -> dict[str, float]:
        """Each policy's share of users, normalised to sum to 1."""
        total = sum(share for _, share in self.arms)
        return {name: share / total for name, share in self.arms}

    def arm(self, user_id: str) -> str:
        if len(self.arms) == 1:
            return self.arms[0][0]
        bounds = self._bounds()
        index = bisect.bisect_right(bounds, user_unit(user_id))
        return self.arms[min(index, len(self.arms) - 1)][0]

    def _bounds(self) -> list[float]:
        total = sum(share for _, share in self.arms)
        bounds, acc = [], 0.0
        for _, share in self.arms[:-1]:
            acc += share / total
            bounds.append(acc)
        return bounds
