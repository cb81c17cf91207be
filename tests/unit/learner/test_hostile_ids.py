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
from recloop.kafka.catalogue import publish_catalogue
from recloop.learner import batch as learner_batch
from recloop.learner.batch import to_batch
from recloop.learner.registry import make_agent
from tests.unit.learner.synth import SPEC, make_catalogue, make_transitions
from tests.unit.test_snapshot_faults import Loop

CAT = make_catalogue(SPEC)
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
    agent = make_agent("mf", SPEC, seed=0, catalogue=CAT)
    good = make_transitions(SPEC, n=64, seed=1)
    agent.learn_many([_hostile(item), *good])  # every update samples from both
    batch = to_batch([_hostile(item)], SPEC, CAT)
    assert batch.slate_BK[0, 0].item() == -1 and not batch.slate_mask_BK[0, 0]
    assert batch.history_BH[0, 0].item() == -1 and not batch.history_mask_BH[0, 0]
    assert batch.candidates_BN[0, 0].item() == -1 and not batch.candidates_mask_BN[0, 0]


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (2**63, b"cannot decode Transition"),  # past int64: the contract refuses it on the wire
        (10**15, b"outside the catalogue"),  # valid on the wire, no item of the learner's world
    ],
    ids=["2**63", "10**15"],
)
def test_the_learner_dead_letters_a_hostile_id_and_learns_from_the_rest(
    tmp_path: Path, item: int, reason: bytes
):
    loop = Loop(tmp_path)
    topics = loop.settings.topics
    publish_catalogue(loop.bus, topics, CAT)  # the learner waits for a catalogue first
    hostile = _hostile(item)
    loop.bus.publish(topics.transitions, hostile.user_id.encode(), codec.encode(hostile))
    loop.produce(20)
    learner = loop.learner()
    try:
        applied = learner.step() + learner.step()
    finally:
        learner.close()
    assert applied == 20  # every valid transition around it was learned from
    [letter] = loop.bus.records(topics.dlq(topics.transitions))
    assert f"hostile-{item}".encode() in letter.value
    assert reason in dict(letter.headers)["recloop.dlq.error"]
