"""What an algorithm knows about the world it learns in.

The wiring builds one ``WorldSpec`` from a producer_sim preset (or from the first requests it
sees) and hands it to ``registry.make_agent``; nothing else about the simulator leaks into
the learner.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """N, the candidates offered per request (0 means the whole catalogue)."""
    history_len: int = 5
    """H, how many recent positive items the state keeps (oldest first)."""

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
        return {
            "n_items": self.n_items,
            "user_obs_dim": self.user_obs_dim,
            "item_feature_dim": self.item_feature_dim,
            "slate_size": self.slate_size,
            "num_candidates": self.num_candidates,
            "history_len": self.history_len,
        }

    @classmethod
    def from_dict(cls, data: dict) -> WorldSpec:
        """Inverse of ``to_dict`` (ignores unknown keys so manifests can grow)."""
        names = {"n_items", "user_obs_dim", "item_feature_dim", "slate_size",
                 "num_candidates", "history_len"}
        return cls(**{k: int(v) for k, v in data.items() if k in names})


def config_from_dict(cls, data: dict):
    """Rebuild a frozen config dataclass from its ``dataclasses.asdict`` form (JSON turns
    tuples into lists; unknown keys are an error so a mismatched manifest is caught)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(data) - known)
    if bad:
        raise ValueError(f"{cls.__module__}.{cls.__name__}: unknown config field(s) {bad}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
