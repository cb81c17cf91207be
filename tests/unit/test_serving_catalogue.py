"""Serving reads the catalogue (issue 13, item 3): features by id, an index chosen by size with
its recall measured, a new version indexed off the request path and swapped in whole."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest

from recloop.core import codec
from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import RecRequest, SlateServed
from recloop.core.membus import MemoryBus
from recloop.core.ports import Slate
from recloop.core.settings import Settings
from recloop.kafka.catalogue import publish_catalogue
from recloop.services.serve import NoCatalogue, ServeService
from recloop.services.serve_wiring import NoRecordedSpec, learner_loader
from recloop.serving.host import PolicyHost
from recloop.serving.items import CatalogueSwap, ServedCatalogue, index_catalogue
from recloop.serving.retrieval import CatalogueIndex, probe_counts, sample_queries
from recloop.serving.server import ServeConfig, SlateServer
from recloop.serving.split import TrafficSplit


class FeaturePolicy:
    """Ranks candidates by <user observation, catalogue features>; has no learned embeddings,
    so retrieval must use the catalogue's own index. Records what it was given."""

    name = "learned"

    def __init__(self) -> None:
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def recommend(self, observation, candidates, k):
        self.seen.append((candidates.ids, candidates.features_NF))
        scores_N = candidates.features_NF @ observation.user_obs
        top_K = np.argsort(-scores_N, kind="stable")[:k]
        return Slate(candidates.ids[top_K], scores_N[top_K].astype(np.float64), np.ones(k))


def _unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _request(i: int, obs, k: int = 3, candidates=()) -> RecRequest:
    return RecRequest(request_id=f"r{i}", user_id=f"u{i}", session_id=f"s{i}", step=0,
                      ts=1.0, k=k, observation=list(map(float, obs)),
                      candidates=list(candidates))  # fmt: skip


def _server(catalogue: ItemCatalogue, retrieve_m: int = 20) -> tuple[SlateServer, FeaturePolicy]:
    host, policy = PolicyHost(["learned"]), FeaturePolicy()
    host.swap("learned", 1, policy)
    config = ServeConfig(TrafficSplit.parse(["learned"]), retrieve_m=retrieve_m)
    return SlateServer(config, host, catalogue=catalogue), policy


def test_no_candidate_list_retrieves_and_ranks_the_catalogues_features():
    features_NF = _unit_rows(400, 4, seed=1)
    server, policy = _server(ItemCatalogue(features_NF), retrieve_m=20)
    obs_D = np.array([0.3, -1.0, 0.2, 0.5], np.float32)
    (slate,) = server.serve_batch([_request(0, obs_D)])

    exact_M = np.argsort(-(features_NF @ obs_D), kind="stable")[:20]
    assert slate.candidates == exact_M.tolist()  # the catalogue features' index, exact at 400
    ids_M, seen_MF = policy.seen[0]
    np.testing.assert_array_equal(seen_MF, features_NF[ids_M])  # real rows, looked up by id
    assert slate.items == exact_M[:3].tolist() and server.stats["retrieved"] == 1


def test_a_snapshots_learned_embeddings_win_over_the_catalogues_features():
    features_NF, learned_ND = _unit_rows(300, 4, seed=9), _unit_rows(300, 4, seed=10)
    host, policy = PolicyHost(["learned"]), FeaturePolicy()
    host.swap("learned", 1, policy, index=CatalogueIndex(learned_ND, kind="flat"))
    server = SlateServer(ServeConfig(TrafficSplit.parse(["learned"]), retrieve_m=15), host,
                         catalogue=ItemCatalogue(features_NF))  # fmt: skip
    obs_D = np.array([1.0, 0.5, -0.5, 0.0], np.float32)
    (slate,) = server.serve_batch([_request(0, obs_D)])
    assert slate.candidates == np.argsort(-(learned_ND @ obs_D), kind="stable")[:15].tolist()
    ids_M, seen_MF = policy.seen[0]
    np.testing.assert_array_equal(seen_MF, features_NF[ids_M])  # still the catalogue's rows


def test_a_query_that_fits_no_index_ranks_the_whole_catalogue_on_its_features():
    features_NF = _unit_rows(50, 4, seed=2)
    server, policy = _server(ItemCatalogue(features_NF))
    (slate,) = server.serve_batch([_request(0, [1.0, 0.0])])  # 2-d: fits no 4-d index
    ids_N, seen_NF = policy.seen[0]
    assert ids_N.tolist() == list(range(50)) and slate.candidates == []
    np.testing.assert_array_equal(seen_NF, features_NF)  # not zeros
    assert server.stats["whole_catalogue"] == 1


def test_index_choice_by_size_with_its_recall_measured_against_exact_search():
    small, large = _unit_rows(500, 8, seed=3), _unit_rows(3000, 8, seed=4)
    exact = CatalogueIndex(small, exact_limit=1000, recall_m=50)
    assert exact.kind == "flat" and exact.recall == 1.0 and not exact.report()["measured"]

    approx = CatalogueIndex(large, exact_limit=1000, recall_m=50, recall_target=0.97)
    report = approx.report()
    assert approx.kind == "ivf" and report["measured"] and report["requested"] == "auto"
    assert approx.recall >= 0.97 and report["nprobe"] in probe_counts(approx._index.nlist)
    # The reported recall is the share of brute force's top-50 the index returns on the
    # sample, in whichever half of it (between clusters, into one) it is lower.
    queries_QD = sample_queries(large, 200, seed=0)
    exact_QM = np.argsort(-(queries_QD @ large.T), axis=1, kind="stable")[:, :50]
    found_QM, _ = approx.search(queries_QD, 50)
    shares = []
    for rows in (slice(0, 100), slice(100, 200)):
        pairs = zip(found_QM[rows].tolist(), exact_QM[rows].tolist(), strict=True)
        shares.append(sum(len(set(found) & set(exact)) for found, exact in pairs) / 5000)
    assert abs(min(shares) - approx.recall) < 1e-9

    assert index_catalogue(ItemCatalogue(np.zeros((5, 0), np.float32))).index is None


def test_auto_holds_its_recall_on_a_clustered_catalogue_for_the_world_s_own_users():
    """A real catalogue is clustered; the index auto builds above the exact limit (IVF, its
    probes tuned at build) keeps recall@50 >= 0.95 for queries it never saw: the
    large_catalogue world's user observations, not the build's query sample."""
    from recloop.producer_sim.presets import large_catalogue
    from recloop.serving.retrieval import exact_top, recall_of

    world = large_catalogue(seed=3, n_items=20_000, n_clusters=40)
    features_ND = world.catalogue.features_NF
    index = CatalogueIndex(features_ND, exact_limit=5_000, recall_m=50)
    interests_UD, _ = world.users.sample(200, np.random.default_rng(4))
    users_QD = world.users.observe(interests_UD).astype(np.float32)
    found_QM, _ = index.search(users_QD, 50)
    assert index.kind == "ivf" and index.nprobe is not None
    assert recall_of(found_QM, exact_top(features_ND, users_QD, 50)) >= 0.95


def test_a_new_catalogue_version_swaps_the_index_while_every_request_is_answered():
    """The next version (more items, so a slower index) builds in another thread while
    batches keep being answered from the current one; then the new one serves, whole."""
    v1 = ItemCatalogue(_unit_rows(2000, 8, seed=5))
    server, _ = _server(v1, retrieve_m=10)
    swap = CatalogueSwap(server.set_catalogue, kind="hnsw", recall_m=10)
    stop = threading.Event()
    builder = threading.Thread(target=swap.run_until, args=(stop,), daemon=True)
    builder.start()
    boost_D = np.ones(8, np.float32) / np.sqrt(8)
    v2 = v1.extended(np.vstack([boost_D * 2.0, _unit_rows(20_000, 8, seed=6)]))
    assert swap.offer(v2) and not swap.offer(v1)  # older than what waits: dropped
    answered, during_build, versions = 0, 0, []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            served = server.served
            assert served is not None
            reqs = [_request(i, boost_D) for i in range(answered, answered + 4)]
            slates = server.serve_batch(reqs, served)
            assert len(slates) == len(reqs)  # none dropped, none waits for the build
            answered += len(slates)
            versions.append(served.version)
            if served.version == 1:
                during_build += 1
                assert all(max(s.candidates) < v1.n_items for s in slates)
            else:
                assert all(s.items[0] == v1.n_items for s in slates)  # the new item, via v2's index
                break
    finally:
        stop.set()
        swap.wake()
        builder.join(timeout=30)
    assert versions[-1] == 2 and versions == sorted(versions) and during_build > 0
    assert isinstance(server.served, ServedCatalogue) and server.served.index is not None
    assert server.served.index.n_items == v2.n_items and swap.swaps == 1


class _NoInstaller:
    """The service's installer slot, for tests that swap policies in by hand."""

    counts: Counter[str] = Counter()
    last_refusal = ""

    def __init__(self, host: PolicyHost) -> None:
        self.host = host


def _service(bus: MemoryBus, settings: Settings) -> tuple[ServeService, FeaturePolicy]:
    host, policy = PolicyHost(["learned"]), FeaturePolicy()
    host.swap("learned", 1, policy)
    config = ServeConfig(TrafficSplit.parse(["learned"]), retrieve_m=10)
    service = ServeService(settings, config, bus=bus, installer=_NoInstaller(host), host=host)
    return service, policy


def _slates(bus: MemoryBus, settings: Settings) -> list[SlateServed]:
    return [codec.decode(m.value, SlateServed) for m in bus.records(settings.topics.slates)]


def test_the_service_waits_for_a_catalogue_then_follows_each_new_version():
    settings, bus = Settings(), MemoryBus()
    topics = settings.topics
    service, _ = _service(bus, settings)

    def send(req: RecRequest) -> None:
        bus.publish(topics.requests, req.user_id.encode(), codec.encode(req))

    obs_D = np.ones(4, np.float32) / 2
    for i in range(3):
        send(_request(i, obs_D))
    assert service.step() == 0 and _slates(bus, settings) == []  # no catalogue: requests wait

    v1 = ItemCatalogue(_unit_rows(30, 4, seed=7))
    publish_catalogue(bus, topics, v1)
    assert service.step() == 3  # the waiting requests, answered from v1
    assert service.snapshot_stats()["catalogue"]["version"] == 1

    v2 = v1.extended(np.vstack([obs_D * 3, _unit_rows(4, 4, seed=8)]))
    publish_catalogue(bus, topics, v2, first=v1.n_items)
    send(_request(3, obs_D, candidates=[31, 32, 1]))  # ids only v2 has
    send(_request(4, obs_D))
    assert service.step() == 2
    slates = {s.request_id: s for s in _slates(bus, settings)}
    assert sorted(slates) == ["r0", "r1", "r2", "r3", "r4"]  # every request, once
    assert slates["r3"].candidates == [31, 32, 1] and slates["r4"].items[0] == 30  # v2's item
    assert bus.records(topics.dlq(topics.requests)) == []
    stats = service.snapshot_stats()
    assert stats["catalogue"]["version"] == 2 and stats["catalogue"]["n_items"] == 35
    assert stats["catalogue"]["index"]["kind"] == "flat" and stats["catalogue_swaps"] == 2


def test_warm_up_without_a_catalogue_says_what_to_start():
    settings, bus = Settings(catalogue_wait_s=0.3), MemoryBus()
    service, _ = _service(bus, settings)
    with pytest.raises(NoCatalogue) as raised:
        service.warm_up(timeout_s=0.1)
    message = str(raised.value)
    assert "RECLOOP_CATALOGUE_WAIT_S" in message and "recloop sim" in message
    assert "\n" not in message


def test_a_snapshot_whose_manifest_records_no_spec_is_refused_with_the_reason():
    load = learner_loader()
    with pytest.raises(NoRecordedSpec, match="records no spec"):
        load("slateq", {}, {"policy": "slateq", "version": 3})


def test_session_states_are_checked_against_the_catalogue_serving():
    from recloop.core.events import SessionState, UserView

    server, _ = _server(ItemCatalogue(_unit_rows(30, 4, seed=11)))
    state = SessionState(user_id="u", session_id="s", view=UserView(history=[3, 40]))
    assert "outside the catalogue [0, 30)" in (server.cache.update(state) or "")
    server.set_catalogue(ItemCatalogue(_unit_rows(50, 4, seed=12), version=2))
    assert server.cache.update(state) is None  # item 40 exists in v2
    assert server.cache.popularity is not None and server.cache.popularity.limit == 50
