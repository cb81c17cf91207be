"""What every agent shares around its own maths: counters, the replay schedule, snapshots.

``ReplayAgent`` implements the ``learner.contract.Agent`` protocol once. An algorithm
subclasses it, calls ``super().__init__(config, spec, seed)`` (which sets those and the three
counters, at 0), sets ``replay`` and ``_policy`` in its constructor, names its stateful parts
in ``_snapshot_parts`` and implements
``update(batch) -> <its Metrics record>`` (or ``_update_on`` when a replay sample is more than
a list of transitions). Hooks it may override: ``_entering`` (what a batch of transitions puts
into replay), ``_snapshot_extra`` and ``_load_extra`` (arrays beyond modules, optimisers, the
policy RNG, counters and replay), ``_batch`` (how a sample of transitions becomes tensors).

The catalogue. ``catalogue`` is the ``recloop.core.catalogue.ItemCatalogue`` the agent looks
item features up in (``set_catalogue``; None until then): every training batch takes its
feature rows from it (``learner.batch.to_batch``), and the policy it shares ranks a request
that names no candidates with the same rows, so an item has one feature row at training and at
serving. A new catalogue version replaces it between updates (``set_catalogue`` again). An
agent of a world with item features (F > 0) refuses to learn without one
(``NoCatalogueError``) rather than train on zeros; an id-only world (F = 0) needs none, and
every agent can be built without one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Transition
from recloop.core.spec import WorldSpec
from recloop.learner import checkpoint
from recloop.learner.batch import TransitionBatch, to_batch
from recloop.learner.contract import Metrics
from recloop.learner.policy import SeededPolicy
from recloop.learner.replay import ReplayBuffer, learn_from_replay


class NoCatalogueError(RuntimeError):
    """An agent of a world with item features was asked to learn before ``set_catalogue``."""


class ReplayAgent:
    """Base of the five agents: ``learn_many``, ``policy``, ``config_dict`` and snapshots."""

    config: Any  # the algorithm's Config, a ReplayConfig
    spec: WorldSpec
    replay: ReplayBuffer
    _policy: SeededPolicy

    transitions_applied: int
    updates: int
    _due: int  # update credit carried between calls (replay.due_updates)
    catalogue: ItemCatalogue | None = None  # the item features it learns and ranks with

    def __init__(self, config: Any, spec: WorldSpec, seed: int) -> None:
        self.config, self.spec, self.seed = config, spec, seed
        self.transitions_applied = 0
        self.updates = 0
        self._due = 0
        self.catalogue = None

    def set_catalogue(self, catalogue: ItemCatalogue | None) -> None:
        """Learn (and let the policy rank) with ``catalogue``'s item features from now on.
        Its width must be the spec's F; its size may differ from ``spec.n_items`` (ids past
        the spec are refused before learning, ids it does not hold yet get zero rows)."""
        self._policy.set_catalogue(catalogue)  # checks the width first
        self.catalogue = catalogue

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
        return self.update(self._batch(sample))

    def _batch(self, transitions: Sequence[Transition]) -> TransitionBatch:
        """``to_batch`` with the agent's catalogue: every ``_update_on`` builds its tensors
        here, so no update trains on features serving would not use."""
        if self.catalogue is None and self.spec.item_feature_dim:
            raise NoCatalogueError(
                f"{self.name}: the world has {self.spec.item_feature_dim} item features and "
                "the agent has no catalogue (set_catalogue); refusing to train on zeros")
        return to_batch(transitions, self.spec, self.catalogue)

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
