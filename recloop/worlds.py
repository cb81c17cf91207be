"""Wiring between producer_sim's worlds and the learner's view of them.

Both the learner service and serving build the same ``learner.spec.WorldSpec`` from a preset
name, so a snapshot trained on a world is served against the same sizes.
"""

from __future__ import annotations

from typing import Any

from recloop.learner.spec import WorldSpec
from recloop.producer_sim.presets import PRESETS, make_world


def preset_names() -> list[str]:
    return sorted(PRESETS)


def learner_spec(preset: str, seed: int = 0, history_len: int = 5, **options: Any) -> WorldSpec:
    """The learner's WorldSpec for a producer_sim preset (``options`` go to the preset)."""
    spec = make_world(preset, seed=seed, **options).spec
    return WorldSpec(
        n_items=spec.n_items,
        user_obs_dim=spec.user_obs_dim,
        item_feature_dim=spec.item_feature_dim,
        slate_size=spec.slate_size,
        num_candidates=spec.num_candidates,
        history_len=history_len,
    )
