"""Wiring between producer_sim's worlds and the learner's view of them.

Both the learner service and serving build the same ``core.spec.WorldSpec`` from a preset
name, so a snapshot trained on a world is served against the same sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from recloop.core.spec import WorldSpec
from recloop.producer_sim.presets import PRESETS, make_world


def preset_names() -> list[str]:
    return sorted(PRESETS)


def learner_spec(preset: str, seed: int = 0, history_len: int = 5, **options: Any) -> WorldSpec:
    """A producer_sim preset's WorldSpec, with the learner's history length H (``options`` go
    to the preset)."""
    world = make_world(preset, seed=seed, **options)
    return dataclasses.replace(world.spec, history_len=history_len)
