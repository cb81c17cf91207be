"""The snapshot layout every agent shares, in both directions.

An agent's state is one flat ``dict[str, np.ndarray]`` (safetensors-friendly). Snapshots
already written use these keys, so they must not change:

    <module>.<param>          each torch module, under the name the agent gives it
    <optimiser>.<i>.<slot>    each optimiser's per-parameter state (Adam moments and step)
    <extra>                   arrays an algorithm adds itself (remembered features, generators)
    policy_rng                the serving policy's exploration generator
    counters                  [transitions_applied, updates, update credit]
    replay.<key>              the replay buffer (its items only with ``snapshot_replay``)

Modules, optimisers and the replay are restored in place; the counters and the policy RNG are
plain values, so ``load_agent`` hands them back for the agent to assign.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from recloop.learner import nets
from recloop.learner.policy import SeededPolicy
from recloop.learner.replay import ReplayBuffer, rng_from_array, rng_to_array

REPLAY = "replay"


@dataclass(frozen=True)
class AgentParts:
    """The stateful objects of an agent that a snapshot restores in place, by key name."""

    modules: Mapping[str, nn.Module]
    optimizers: Mapping[str, torch.optim.Optimizer]
    replay: ReplayBuffer


@dataclass(frozen=True)
class Restored:
    """What ``load_agent`` read that the agent must assign itself."""

    counters: tuple[int, ...]
    policy_rng: np.random.Generator


def with_prefix(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with every key put under ``prefix.``."""
    return {f"{prefix}.{k}": v for k, v in arrays.items()}


def under_prefix(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays stored under ``prefix.``, with the prefix taken off again."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}


def save_agent(parts: AgentParts, counters: Sequence[int], policy_rng: np.random.Generator,
               with_replay_items: bool,
               extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """An agent's whole state as snapshot arrays (see the module docstring for the keys)."""
    out: dict[str, np.ndarray] = {}
    for name, module in parts.modules.items():
        out.update(nets.module_to_arrays(name, module))
    for name, opt in parts.optimizers.items():
        out.update(nets.optimizer_to_arrays(name, opt))
    out.update(extra or {})
    out["policy_rng"] = rng_to_array(policy_rng)
    out["counters"] = np.array(list(counters))
    out.update(with_prefix(REPLAY, parts.replay.state_arrays(with_replay_items)))
    return out


def load_agent(parts: AgentParts, arrays: dict[str, np.ndarray]) -> Restored:
    """Inverse of ``save_agent`` for ``parts``; an algorithm reads its extra arrays itself."""
    for name, module in parts.modules.items():
        nets.module_from_arrays(name, module, arrays)
    for name, opt in parts.optimizers.items():
        nets.optimizer_from_arrays(name, opt, arrays)
    parts.replay.load_state_arrays(under_prefix(REPLAY, arrays))
    return Restored(counters=tuple(int(x) for x in arrays["counters"]),
                    policy_rng=rng_from_array(arrays["policy_rng"]))


PolicyT = TypeVar("PolicyT", bound=SeededPolicy)


def resume_policy_rng(policy: PolicyT, arrays: Mapping[str, np.ndarray]) -> PolicyT:
    """``policy``, drawing on from the snapshot's exploration generator where it has one, so a
    served copy explores exactly as the learner's own policy would."""
    if "policy_rng" in arrays:
        policy.rng = rng_from_array(arrays["policy_rng"])
    return policy
