"""What ``recloop serve`` builds for the learner's snapshots: the loader of their policies.

Serving knows no world: the dimensions of a snapshot's networks come from the ``spec`` its
manifest records (the ``WorldSpec`` it was trained with), and the items from the catalogue
the service follows on Kafka. A manifest without a spec cannot be rebuilt and is refused
(the installer counts the refusal with this reason and keeps serving what it serves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from recloop.core.settings import Settings
from recloop.serving.snapshots import PolicyLoader


class NoRecordedSpec(ValueError):
    """A snapshot manifest that records no ``spec``: its tensors' shapes are unknown."""


def learner_loader() -> PolicyLoader:
    """The production loader: ``learner.registry.load_policy`` with the manifest's spec."""
    import torch

    from recloop.core.spec import WorldSpec
    from recloop.learner import registry

    # Inference on small batches: one thread, so serving does not fight the other processes.
    torch.set_num_threads(1)

    def load(algorithm: str, tensors: dict[str, np.ndarray], manifest: dict[str, Any]):
        recorded = manifest.get("spec")
        if not isinstance(recorded, dict):
            raise NoRecordedSpec(
                f"the manifest of {manifest.get('policy')!r} v{manifest.get('version')} records "
                f"no spec, so its network sizes are unknown (snapshots of this learner record "
                f"one; serving has no other source of dimensions)"
            )
        return registry.load_policy(algorithm, tensors, manifest, WorldSpec.from_dict(recorded))

    return load


def snapshot_root(settings: Settings) -> Path:
    return settings.resolved_snapshot_dir
