"""A transition naming an item id of 2**63 (or past the catalogue) cannot crash the learner.

Issue 12, finding 3: item ids had no range check, and the learner turns them into int64
tensors, where 2**63 raises ``OverflowError`` at every update that samples it (and the
replay kept in snapshots brings it back after a restart). The contract's decoder refuses an
id past int64, so on the wire such a transition is dead-lettered; ``learner.batch`` refuses
one outside the catalogue (``refusal``) and, should one get in anyway, lays its ids out as
absent instead of crashing.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from recloop.core import codec
from recloop.learner import batch as learner_batch
from recloop.learner.batch import to_batch
from recloop.learner.registry import make_agent
from tests.unit.learner.synth import SPEC, make_transitions
from tests.unit.test_snapshot_faults import Loop

HOSTILE_IDS = [2**63, 10**15, SPEC.n_items, -5]


def _hostile(item: int, index: int = 0):
    t = make_transitions(SPEC, n=index + 1, seed=7)[index]
    return msgspec.structs.replace(
        t, transition_id=f"hostile-{item}", slate=[item, *t.slate[1:]],
        state=msgspec.structs.replace(t.state, history=[item]),
        candidates=[item, *t.candidates[1:]],
    )  # fmt: skip


@pytest.mark.parametrize("item", HOSTILE_IDS)
def test_an_id_outside_the_catalogue_is_refused_with_a_reason(item):
    reason = learner_batch.refusal(_hostile(item), SPEC)
    assert (
        reason is not None and f"item {item} is outside the catalogue [0, {SPEC.n_items})" in reason
    )
    assert learner_batch.refusal(make_transitions(SPEC, n=1, seed=7)[0], SPEC) is None


@pytest.mark.parametrize("item", HOSTILE_IDS)
def test_an_agent_sampling_such_a_transition_keeps_learning(item):
    agent = make_agent("mf", SPEC, seed=0)
    good = make_transitions(SPEC, n=64, seed=1)
    agent.learn_many([_hostile(item), *good])  # every update samples from both
    batch = to_batch([_hostile(item)], SPEC)
    assert batch.slate_BK[0, 0].item() == -1 and not batch.slate_mask_BK[0, 0]
    assert batch.history_BH[0, 0].item() == -1 and not batch.history_mask_BH[0, 0]
    assert batch.candidates_BN[0, 0].item() == -1 and not batch.candidates_mask_BN[0, 0]


def test_the_learner_dead_letters_an_id_of_2_63_on_the_wire_and_goes_on(tmp_path: Path):
    loop = Loop(tmp_path)
    topics = loop.settings.topics
    hostile = _hostile(2**63)
    loop.bus.publish(topics.transitions, hostile.user_id.encode(), codec.encode(hostile))
    loop.produce(20)
    learner = loop.learner()
    try:
        applied = learner.step() + learner.step()
    finally:
        learner.close()
    assert applied == 20  # every valid transition around it was learned from
    [letter] = loop.bus.records(topics.dlq(topics.transitions))
    assert b"hostile-9223372036854775808" in letter.value


def test_the_learner_dead_letters_an_item_outside_its_catalogue_and_goes_on(tmp_path: Path):
    """10**15 is a valid id on the wire (int64) but names no item of the learner's world:
    the learner dead-letters it with the reason instead of learning from it."""
    loop = Loop(tmp_path)
    topics = loop.settings.topics
    hostile = _hostile(10**15)
    loop.bus.publish(topics.transitions, hostile.user_id.encode(), codec.encode(hostile))
    loop.produce(20)
    learner = loop.learner()
    try:
        applied = learner.step() + learner.step()
    finally:
        learner.close()
    assert applied == 20
    [letter] = loop.bus.records(topics.dlq(topics.transitions))
    assert b"hostile-1000000000000000" in letter.value
    assert b"outside the catalogue" in dict(letter.headers)["recloop.dlq.error"]
