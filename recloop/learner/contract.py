"""The agent contract as types: what the services may call on any algorithm's agent, and
the metrics record an update returns.

The services (learn, the in-process loop, the benchmarks) hold an ``Agent`` and nothing more
specific: they feed it transitions, publish its state and config in snapshots, and serve its
policy. Each algorithm module names its agent class as ``AGENT`` (``registry`` builds it from
there) and returns its own frozen ``Metrics`` subclass from ``update``, with fields named as
the metrics appear in snapshot manifests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from recloop.core.events import Transition
from recloop.core.ports import SlatePolicy


@dataclass(frozen=True)
class Metrics:
    """Base of the algorithms' metrics records: every field a float, read by name
    (``metrics.q_loss``) or, for manifests, logs and Prometheus, as ``as_dict()``."""

    def as_dict(self) -> dict[str, float]:
        """The record as ``{field: value}``, in field order."""
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


@runtime_checkable
class Agent(Protocol):
    """A learning agent: it owns its update schedule, its serving policy and its state."""

    @property
    def name(self) -> str:
        """The policy name its slates are logged under (``policy().name``)."""
        ...

    def learn_many(self, transitions: Sequence[Transition]) -> Metrics | None:
        """Take in answered slates and run the updates now due (replay and schedule are the
        agent's). Returns the last update's metrics, or None when no update ran."""
        ...

    def policy(self) -> SlatePolicy:
        """The live, exploring policy that shares the agent's networks (no copy)."""
        ...

    def config_dict(self) -> dict[str, Any]:
        """The frozen Config as a plain dict, saved in every snapshot's manifest; an
        algorithm's ``load_policy`` rebuilds the Config from it."""
        ...

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Everything needed to resume learning, as flat arrays (``learner.checkpoint``'s
        key layout; serving loads a policy from the same arrays)."""
        ...

    def load_state_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Restore ``state_tensors()`` into this agent, in place (same Config and spec)."""
        ...
