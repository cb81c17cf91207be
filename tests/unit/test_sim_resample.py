"""A world that resamples its documents (RecSim's fresh documents): every new document is
registered, as the next catalogue version, before any request names it (issue 13: "worlds
that create documents on the fly register them before they request them")."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import RecRequest, SlateServed
from recloop.core.membus import MemoryBus
from recloop.core.settings import Settings
from recloop.kafka.catalogue import CatalogueFollower, publish_catalogue
from recloop.producer_sim.cohort import Cohort
from recloop.producer_sim.policies import RandomPolicy
from recloop.producer_sim.presets import interest_evolution
from recloop.producer_sim.runner import run_episodes

N, EVERY, COUNT = 300, 40, 25


def _world(**options: int):
    return interest_evolution(seed=3, n_items=N, resample_every=EVERY, resample_count=COUNT,
                              **options)  # fmt: skip


def test_a_resample_extends_the_catalogue_and_moves_the_live_window() -> None:
    world = _world()
    cohort = Cohort(world, capacity=8, seed=0)
    cohort.start(np.arange(8))
    first = cohort.sim.item_catalogue
    assert first.version == 1 and first.n_items == N and cohort.refresh_documents() is None
    slots = np.arange(8)
    for _ in range(EVERY // 8):  # 40 user-steps
        cohort.request(slots, 1.0)
        cohort.answer(slots, np.array([cohort.candidates(s).ids[:3] for s in slots]),
                      [("random", 0)] * 8, 1.0)  # fmt: skip
        cohort.start(np.flatnonzero(~cohort.sim.pop.active_U))
    new = cohort.refresh_documents()
    assert isinstance(new, ItemCatalogue) and (new.version, new.n_items) == (2, N + COUNT)
    np.testing.assert_array_equal(new.features_NF[:N], first.features_NF)  # old ids keep rows
    np.testing.assert_array_equal(new.features_NF, cohort.sim.catalogue.features_NF)
    assert cohort.sim.live_lo == COUNT and cohort.refresh_documents() is None
    offered = np.concatenate([r.candidates for r in cohort.request(slots, 2.0)])
    assert offered.min() >= COUNT and offered.max() < N + COUNT  # the live window only


def test_every_request_names_only_registered_documents_and_new_ones_are_offered() -> None:
    log: list[object] = []
    report = run_episodes(_world(), RandomPolicy(seed=1), episodes=12, seed=4, sink=log.append,
                          users_in_parallel=6,
                          on_catalogue=lambda cat, first: log.append((cat, first)))  # fmt: skip
    registered, versions, named_new = N, [1], 0
    for entry in log:
        if isinstance(entry, tuple):
            catalogue, first = entry
            assert first == registered and catalogue.n_items == registered + COUNT
            registered = catalogue.n_items
            versions.append(catalogue.version)
        elif isinstance(entry, RecRequest):
            assert max(entry.candidates) < registered, "requested before it was registered"
            named_new += max(entry.candidates) >= N
        elif isinstance(entry, SlateServed):
            assert set(entry.items) <= set(entry.candidates)
    assert versions == list(range(1, len(versions) + 1)) and len(versions) > 3
    assert named_new > 0 and report.episodes == 12


def test_the_sim_publishes_each_version_before_the_requests_that_name_it() -> None:
    """Over the bus: a follower installs each version from ``items`` + ``catalogue`` with
    the new rows only (``first=``) sent, and its rows are the simulation's."""
    bus, settings = MemoryBus(partitions=1), Settings()
    world = interest_evolution(seed=3, n_items=2000, resample_every=1, resample_count=COUNT)
    cohort = Cohort(world, capacity=1, seed=0)  # two chunks of 20-d rows: 1,638 + 362
    publish_catalogue(bus, settings.topics, cohort.sim.item_catalogue)
    follower = CatalogueFollower(bus, settings.topics, "test")
    assert follower.poll() is not None and follower.current.version == 1
    cohort.start(np.arange(1))
    cohort.request(np.arange(1), 1.0)
    cohort.answer(np.arange(1), np.array([cohort.candidates(0).ids[:3]]), [("r", 0)], 1.0)
    known = cohort.sim.catalogue.n_items
    new = cohort.refresh_documents()
    assert new is not None
    sent = publish_catalogue(bus, settings.topics, new, first=known)
    assert (sent, len(new.chunks())) == (1, 2)  # only the chunk holding new items
    got = follower.poll()
    assert got is not None and got.version == 2 and got.sha256 == new.sha256
    np.testing.assert_array_equal(got.features_NF, cohort.sim.catalogue.features_NF)


@pytest.mark.parametrize("count", [0, N + 1])
def test_resampling_needs_a_count_within_the_catalogue(count: int) -> None:
    with pytest.raises(ValueError, match="resample_count"):
        interest_evolution(n_items=N, resample_every=10, resample_count=count)


def test_without_resampling_nothing_changes() -> None:
    a = run_episodes(interest_evolution(n_items=N), RandomPolicy(seed=1), episodes=8, seed=2)
    b = run_episodes(interest_evolution(n_items=N, resample_every=0, resample_count=COUNT),
                     RandomPolicy(seed=1), episodes=8, seed=2)  # fmt: skip
    np.testing.assert_array_equal(a.return_E, b.return_E)
