"""What every agent shares around its own maths: counters, the replay schedule, snapshots.

``ReplayAgent`` implements the ``learner.contract.Agent`` protocol once. An algorithm
subclasses it, calls ``super().__init__(config, spec, seed)`` (which sets those and the three
counters, at 0), sets ``replay`` and ``_policy`` in its constructor, names its stateful parts
in ``_snapshot_parts`` and implements
``update(batch) -> <its Metrics record>`` (or ``_update_on`` when a replay sample is more than
a list of transitions). Hooks it may override: ``_entering`` (what a batch of transitions puts
into replay), ``_snapshot_extra`` and ``_load_extra`` (arrays beyond modules, optimisers, the
policy RNG, counters and replay).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from recloop.core.events import Transition
from recloop.core.spec import WorldSpec
from recloop.learner import checkpoint
from recloop.learner.batch import to_batch
from recloop.learner.contract import Metrics
from recloop.learner.policy import SeededPolicy
from recloop.learner.replay import ReplayBuffer, learn_from_replay


class ReplayAgent:
    """Base of the five agents: ``learn_many``, ``policy``, ``config_dict`` and snapshots."""

    config: Any  # the algorithm's Config, a ReplayConfig
    spec: WorldSpec
    replay: ReplayBuffer
    _policy: SeededPolicy

    transitions_applied: int
    updates: int
    _due: int  # update credit carried between calls (replay.due_updates)

    def __init__(self, config: Any, spec: WorldSpec, seed: int) -> None:
        self.config, self.spec, self.seed = config, spec, seed
        self.transitions_applied = 0
        self.updates = 0
        self._due = 0

    @property
    def name(self) -> str:
        return self._policy.name

    def learn_many(self, transitions: Sequence[Transition]) -> Metrics | None:
        entering = self._entering(transitions)
        self.transitions_applied += len(transitions)
        metrics, self._due = learn_from_replay(self.replay, self.config, entering, self._due,
                                               self._update_on)
        return metrics

    def _entering(self, transitions: Sequence[Transition]) -> Sequence[Any]:
        """What ``transitions`` put into replay (the transitions themselves by default)."""
        return transitions

    def _update_on(self, sample: Any) -> Metrics:
        """One update on a replay sample (a list of transitions by default)."""
        return self.update(to_batch(sample, self.spec))

    def update(self, batch: Any) -> Metrics:
        raise NotImplementedError

    def policy(self) -> SeededPolicy:
        return self._policy

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    # ---- snapshots

    def _snapshot_parts(self) -> checkpoint.AgentParts:
        raise NotImplementedError

    def _snapshot_extra(self) -> dict[str, np.ndarray]:
        return {}

    def _load_extra(self, tensors: dict[str, np.ndarray]) -> None:
        """Restore what ``_snapshot_extra`` saved."""

    def state_tensors(self) -> dict[str, np.ndarray]:
        return checkpoint.save_agent(
            self._snapshot_parts(), (self.transitions_applied, self.updates, self._due),
            self._policy.rng, self.config.snapshot_replay, extra=self._snapshot_extra())

    def load_state_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        restored = checkpoint.load_agent(self._snapshot_parts(), tensors)
        self.transitions_applied, self.updates, self._due = restored.counters
        self._policy.rng = restored.policy_rng
        self._load_extra(tensors)
