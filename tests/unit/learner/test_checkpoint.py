"""The shared snapshot layout (``learner.checkpoint``): key names that written snapshots
already use, and an exact round trip of every part."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from recloop.learner import checkpoint, registry
from recloop.learner.replay import ReplayBuffer
from tests.unit.learner.synth import SPEC, make_catalogue, make_transitions

torch.set_num_threads(1)

# The top-level key families of each algorithm's snapshot; renaming one breaks old snapshots.
FAMILIES = {
    "mf": {"net", "opt"},
    "wolpertinger": {"net", "target", "actor_opt", "critic_opt", "item_features"},
    "drr": {"net", "target", "actor_opt", "critic_opt", "item_features"},
    "reinforce": {"net", "opt", "gen", "sessions"},
    "slateq": {"q", "q_target", "choice", "opt"},
    "slateq_myopic": {"q", "q_target", "choice", "opt"},
}
SHARED = {"policy_rng", "counters", "replay"}


@pytest.mark.parametrize("name", registry.names())
def test_snapshot_keys_keep_their_names(name):
    agent = registry.make_agent(name, SPEC, 0, catalogue=make_catalogue(SPEC), batch_size=8,
                                learning_starts=8, snapshot_replay=True)
    agent.learn_many(make_transitions(n=30, seed=1))
    tensors = agent.state_tensors()
    assert {k.split(".")[0] for k in tensors} == FAMILIES[name] | SHARED
    assert {"replay.rng", "replay.counters", "replay.items_blob", "replay.items_len"} <= set(tensors)
    np.testing.assert_array_equal(tensors["counters"],
                                  [agent.transitions_applied, agent.updates, agent._due])


def _parts(seed: int) -> checkpoint.AgentParts:
    torch.manual_seed(seed)
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()  # Adam now has moments to snapshot
    replay = ReplayBuffer(10, seed)
    replay.push([(float(i),) for i in range(seed + 3)])
    return checkpoint.AgentParts({"net": net}, {"opt": opt}, replay)


def test_save_then_load_restores_every_part():
    source, target = _parts(1), _parts(2)
    rng = np.random.default_rng(5)
    rng.random()
    arrays = checkpoint.save_agent(source, (7, 3, 1), rng, with_replay_items=True,
                                   extra={"extra": np.arange(3)})
    restored = checkpoint.load_agent(target, arrays)
    assert restored.counters == (7, 3, 1)
    assert restored.policy_rng.random() == rng.random()
    again = checkpoint.save_agent(target, (7, 3, 1), restored.policy_rng, True)
    for key, value in again.items():
        if key != "policy_rng":  # drawn from above, so it moved on
            np.testing.assert_array_equal(value, arrays[key], err_msg=key)
    assert set(arrays) - set(again) == {"extra"}  # extras are the algorithm's to read back


def test_prefix_helpers_are_inverse():
    arrays = {"a": np.zeros(1), "b.c": np.ones(2)}
    stored = checkpoint.with_prefix("sessions", arrays)
    assert set(stored) == {"sessions.a", "sessions.b.c"}
    mixed = {**stored, "sessionsx": np.zeros(1), "other.a": np.zeros(1)}
    assert checkpoint.under_prefix("sessions", mixed).keys() == arrays.keys()
