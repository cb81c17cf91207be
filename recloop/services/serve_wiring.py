"""What ``recloop serve`` builds from a world preset: the snapshot loader and the catalogue.

Until a catalogue of its own exists, serving learns the catalogue's size and item features,
and the learner's ``WorldSpec``, from the preset's world (the import-linter contract lists
this module's ``producer_sim`` imports as the exception).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from recloop.core.settings import Settings
from recloop.serving.server import ItemFeatures
from recloop.serving.snapshots import PolicyLoader


def learner_loader(preset: str, seed: int = 0, **world_options: Any) -> PolicyLoader:
    """The production loader: ``learner.registry.load_policy`` with the preset's WorldSpec.

    A manifest that records its own ``spec`` (the sizes it was trained with) wins over the
    preset's, so a snapshot is always rebuilt with the shapes of its tensors.
    """
    import torch

    from recloop.core.spec import WorldSpec
    from recloop.learner import registry
    from recloop.worlds import learner_spec

    # Inference on small batches: one thread, so serving does not fight the other processes.
    torch.set_num_threads(1)
    spec = learner_spec(preset, seed=seed, **world_options)

    def load(algorithm: str, tensors: dict[str, np.ndarray], manifest: dict[str, Any]):
        recorded = manifest.get("spec")
        world = WorldSpec.from_dict(recorded) if isinstance(recorded, dict) else spec
        return registry.load_policy(algorithm, tensors, manifest, world)

    return load


def catalogue_of(preset: str, seed: int = 0, **world_options: Any) -> tuple[int, ItemFeatures]:
    """The preset's catalogue size and feature lookup (for requests without candidates)."""
    from recloop.producer_sim.presets import make_world

    world = make_world(preset, seed=seed, **world_options)
    return world.catalogue.n_items, world.item_features


def snapshot_root(settings: Settings) -> Path:
    return settings.resolved_snapshot_dir
