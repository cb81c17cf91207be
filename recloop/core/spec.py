"""The sizes of a world, as the simulator builds it and as a learner is built for it.

One plain, frozen record shared by ``producer_sim`` (``World.spec``), the learner (every agent
is built for one and saves it in each snapshot's manifest) and serving (which loads a snapshot
against the spec its manifest records). It lives in core because it is part of the contract
between them: a snapshot trained on a world is served against the same sizes.

``history_len`` is the learner's view, not a fact of the world: the streams fold keeps a longer
window of the user's recent positive items (``FoldConfig.history_len``) and a learner's state
reads its last H. The simulator never sets it, so a world's spec carries the default, and the
learner service chooses H for the learner it builds (``LearnConfig.history_len``; the other
sizes come from the catalogue and the first transitions, ``recloop.services.learn.spec_from``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of the world, fixed for the lifetime of an agent and saved with every snapshot."""

    n_items: int
    """Catalogue size: item ids are integers in ``[0, n_items)``."""
    user_obs_dim: int
    """Length U of the user's observation vector (may be 0)."""
    item_feature_dim: int
    """Columns F of each candidate's observable feature row (0 for id-only worlds)."""
    slate_size: int
    """K, the number of items served per request."""
    num_candidates: int
    """N, the candidates offered per request (0 means the whole catalogue: retrieve yourself)."""
    history_len: int = 5
    """H, how many recent positive items a learner's state reads (oldest first)."""

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.slate_size < 1:
            raise ValueError(f"WorldSpec needs n_items >= 1 and slate_size >= 1, got {self}")
        if min(self.user_obs_dim, self.item_feature_dim, self.num_candidates) < 0:
            raise ValueError(f"WorldSpec sizes must be non-negative, got {self}")
        if self.history_len < 1:
            raise ValueError(f"WorldSpec.history_len must be >= 1, got {self.history_len}")
        if self.num_candidates and self.num_candidates < self.slate_size:
            raise ValueError(
                f"num_candidates {self.num_candidates} < slate_size {self.slate_size}"
            )

    def to_dict(self) -> dict[str, int]:
        """JSON-able form for manifests."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldSpec:
        """Inverse of ``to_dict`` (ignores unknown keys so manifests can grow)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})
