"""Algorithms by name, imported lazily so a process only loads the one it runs.

    agent = make_agent("slateq", spec, seed=0, catalogue=cat, lr=1e-3)  # learning side
    policy = load_policy("slateq", tensors, manifest, spec)   # serving side, inference only

Each name maps to a module in ``recloop.learner.algorithms`` plus config overrides that define the
variant ("slateq_myopic" is SlateQ with γ = 0, the paper's MYOP-TS). A module names its parts
explicitly: ``Config`` (frozen), ``AGENT`` (its agent class, built as
``AGENT(config, spec, seed)``, an ``learner.contract.Agent``) and ``load_policy``.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

import numpy as np

from recloop.core.catalogue import ItemCatalogue
from recloop.core.spec import WorldSpec
from recloop.learner.agent import ReplayAgent

_ALGORITHMS: dict[str, tuple[str, dict[str, Any]]] = {
    "mf": ("recloop.learner.algorithms.mf", {}),
    "wolpertinger": ("recloop.learner.algorithms.wolpertinger", {}),
    "drr": ("recloop.learner.algorithms.drr", {}),
    "reinforce": ("recloop.learner.algorithms.reinforce", {}),
    "slateq": ("recloop.learner.algorithms.slateq", {}),
    "slateq_myopic": ("recloop.learner.algorithms.slateq", {"gamma": 0.0}),
}


class UnknownAlgorithmError(KeyError):
    """The name is not in the registry; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def names() -> list[str]:
    """Every registered algorithm name."""
    return list(_ALGORITHMS)


def _entry(name: str) -> tuple[str, dict[str, Any]]:
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise UnknownAlgorithmError(
            f"unknown algorithm {name!r}; known: {', '.join(names())}"
        ) from None


def module(name: str) -> ModuleType:
    """The algorithm's module (imports it on first use)."""
    return importlib.import_module(_entry(name)[0])


def make_config(name: str, **overrides: Any):
    """The variant's frozen ``Config`` with ``overrides`` applied (unknown fields are an error)."""
    mod = module(name)
    merged = {**_entry(name)[1], **overrides}
    known = {f.name for f in dataclasses.fields(mod.Config)}
    bad = sorted(set(merged) - known)
    if bad:
        raise TypeError(f"{name}: unknown config field(s) {bad}; known: {sorted(known)}")
    return mod.Config(**merged)


def make_agent(name: str, spec: WorldSpec, seed: int, catalogue: ItemCatalogue | None = None,
               **overrides: Any) -> ReplayAgent:
    """A fresh learning agent for ``name`` (``overrides`` are Config fields) that learns with
    ``catalogue``'s item features (``ReplayAgent.set_catalogue``; a world with features needs
    one before it learns). Every agent is a ``ReplayAgent``, so it meets
    ``learner.contract.Agent``; the services need no more."""
    agent = agent_class(name)(make_config(name, **overrides), spec, seed)
    if catalogue is not None:
        agent.set_catalogue(catalogue)
    return agent


def agent_class(name: str) -> type[ReplayAgent]:
    """The agent class the algorithm's module names as ``AGENT``."""
    mod = module(name)
    cls = getattr(mod, "AGENT", None)
    if not (isinstance(cls, type) and issubclass(cls, ReplayAgent)):
        raise TypeError(f"{mod.__name__} must name its agent class, a ReplayAgent, as AGENT")
    return cls


def load_policy(name: str, tensors: dict[str, np.ndarray], manifest: dict, spec: WorldSpec):
    """An inference-only policy from a snapshot's tensors and manifest."""
    return module(name).load_policy(tensors, manifest, spec)

