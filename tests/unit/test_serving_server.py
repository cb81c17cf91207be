"""The serving core: request validation, slate fields, session views, retrieval from faiss.

Items and their features come from an ``ItemCatalogue`` (``CATALOGUE``: 20 items, one
feature each, item i's feature is i / 10), never from the request."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import RecRequest, SessionState, UserView
from recloop.core.ports import Slate
from recloop.serving.fallback import PopularityCounts
from recloop.serving.host import PolicyHost
from recloop.serving.retrieval import CatalogueIndex
from recloop.serving.server import ServeConfig, SlateServer, validate_request
from recloop.serving.session_cache import SessionCache
from recloop.serving.split import TrafficSplit

CATALOGUE = ItemCatalogue(np.arange(20, dtype=np.float32).reshape(20, 1) / 10)


def _request(**overrides) -> RecRequest:
    fields = dict(request_id="r1", user_id="u1", session_id="s1", step=4, ts=123.5, k=2,
                  observation=[0.5, -0.5], candidates=[3, 9, 11])  # fmt: skip
    fields.update(overrides)
    return RecRequest(**fields)


def test_validate_request_checks_ids_against_the_catalogue():
    small = ItemCatalogue(np.zeros((10, 1), np.float32), version=3)
    assert validate_request(_request(), CATALOGUE) is None
    assert "exceeds" in validate_request(_request(k=4), CATALOGUE)
    assert "duplicates" in validate_request(_request(candidates=[3, 3, 9]), CATALOGUE)
    assert "[0, 10) (catalogue v3)" in validate_request(_request(), small)
    assert "no catalogue" in validate_request(_request(), None)
    assert validate_request(_request(candidates=[]), CATALOGUE) is None
    assert "exceeds the catalogue of 10" in validate_request(_request(candidates=[], k=11), small)


def test_slate_fields_echo_the_request():
    server = SlateServer(ServeConfig(TrafficSplit.parse(["random"])), PolicyHost([]),
                         catalogue=CATALOGUE)  # fmt: skip
    req = _request()
    slate = server.serve_batch([req])[0]
    assert (slate.request_id, slate.user_id, slate.session_id, slate.step) == ("r1", "u1", "s1", 4)
    assert slate.request_ts == 123.5 and slate.ts >= 123.5
    assert slate.policy == "random" and slate.policy_version == 0
    assert len(slate.items) == 2 and set(slate.items) <= {3, 9, 11}
    assert slate.propensities == [2 / 3, 2 / 3] and len(slate.scores) == 2
    assert slate.candidates == [3, 9, 11]
    assert "candidate_features" not in slate.__struct_fields__  # ids only on the wire (v2)
    assert slate.observation == [0.5, -0.5]


class _Recorder:
    """Records the observation it was given; deterministic first-k slate."""

    name = "rec"

    def __init__(self):
        self.seen = []
        self.features = []

    def recommend(self, observation, candidates, k):
        self.seen.append(observation)
        self.features.append(candidates.features_NF)
        return Slate(candidates.ids[:k], np.zeros(k), np.ones(k))


def test_observation_uses_the_cached_view_of_the_same_session():
    host, cache = PolicyHost(["p"]), SessionCache(PopularityCounts())
    recorder = _Recorder()
    host.swap("p", 1, recorder)
    server = SlateServer(ServeConfig(TrafficSplit.parse(["p"])), host, cache, CATALOGUE)
    view = UserView(observation=[9.0, 9.0], history=[3, 11], history_rewards=[1.0, 2.0], step=4)
    cache.update(SessionState(user_id="u1", session_id="s1", view=view))
    server.serve_batch([_request(), _request(session_id="s2", observation=[])])
    same, other = recorder.seen
    assert same.history == (3, 11) and same.history_rewards == (1.0, 2.0) and same.step == 4
    assert same.user_obs.tolist() == [0.5, -0.5]  # the request's own observation wins
    assert other.history == () and other.user_obs.shape == (0,)
    # The policy ranks the catalogue's features of the request's ids.
    np.testing.assert_array_equal(recorder.features[0], CATALOGUE.features_NF[[3, 9, 11]])
    np.testing.assert_allclose(recorder.features[0][:, 0], [0.3, 0.9, 1.1], rtol=1e-6)


def test_popularity_counts_grow_from_session_state():
    counts = PopularityCounts(5)
    cache = SessionCache(counts)
    cache.update(SessionState(user_id="a", session_id="s", view=UserView(history=[1, 2])))
    cache.update(SessionState(user_id="a", session_id="s", view=UserView(history=[1, 2, 4])))
    cache.update(SessionState(user_id="b", session_id="t", view=UserView(history=[4])))
    assert counts.get(np.arange(5)).tolist() == [0, 1, 1, 0, 2]


def test_faiss_flat_returns_the_exact_top_m():
    rng = np.random.default_rng(0)
    emb_ND = rng.normal(size=(500, 8)).astype(np.float32)
    queries_QD = rng.normal(size=(6, 8)).astype(np.float32)
    index = CatalogueIndex(emb_ND, kind="flat")
    ids_QM, scores_QM = index.search(queries_QD, 20)
    brute_QN = queries_QD @ emb_ND.T
    for q in range(6):
        expected = np.argsort(-brute_QN[q], kind="stable")[:20]
        assert ids_QM[q].tolist() == expected.tolist()
        np.testing.assert_allclose(scores_QM[q], brute_QN[q, expected], rtol=1e-5)


def _catalogue(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2000 items and 16 queries in 8-d, and the exact top-10 of each query by brute force."""
    rng = np.random.default_rng(seed)
    emb_ND = rng.normal(size=(2000, 8)).astype(np.float32)
    queries_QD = rng.normal(size=(16, 8)).astype(np.float32)
    exact_QM = np.argsort(-(queries_QD @ emb_ND.T), axis=1, kind="stable")[:, :10]
    return emb_ND, queries_QD, exact_QM


SEEDS = range(10)


@pytest.mark.parametrize("seed", SEEDS)
def test_hnsw_at_its_search_depth_finds_the_exact_top_10(seed):
    # efSearch 128 explores far more than 10 neighbours of a 2000-item graph: on these
    # catalogues it misses nothing (a shallow search, efSearch 10, misses some).
    emb_ND, queries_QD, exact_QM = _catalogue(seed)
    ids_QM, scores_QM = CatalogueIndex(emb_ND, kind="hnsw").search(queries_QD, 10)
    np.testing.assert_array_equal(ids_QM, exact_QM)
    np.testing.assert_allclose(scores_QM, np.take_along_axis(queries_QD @ emb_ND.T, exact_QM, 1),
                               rtol=1e-5)  # fmt: skip


def test_ivf_is_exact_within_the_lists_it_probes_and_recalls_most_of_the_top_10():
    """IVF-Flat's guarantee: the exact top-m of the items in the ``nprobe`` lists whose
    centroids score highest; beyond those lists it sees nothing, so its recall of the true
    top-10 is what its probes buy: as many as its build measured for recall 0.97 on its own
    query sample (these queries are not that sample)."""
    recalls = []
    for seed in SEEDS:
        emb_ND, queries_QD, exact_QM = _catalogue(seed)
        index = CatalogueIndex(emb_ND, kind="ivf")
        ivf = faiss.extract_index_ivf(index._index)
        assert index.nprobe == ivf.nprobe < ivf.nlist and index.recall >= 0.97
        _, lists_QP = ivf.quantizer.search(queries_QD, ivf.nprobe)
        members = [faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i))
                   for i in range(ivf.nlist)]  # fmt: skip
        ids_QM, _ = index.search(queries_QD, 10)
        for q, (ids_M, exact_M) in enumerate(zip(ids_QM, exact_QM, strict=True)):
            pool_P = np.concatenate([members[i] for i in lists_QP[q]])
            top_M = pool_P[np.argsort(-(emb_ND[pool_P] @ queries_QD[q]), kind="stable")[:10]]
            assert ids_M.tolist() == top_M.tolist()
            recalls.append(len(set(ids_M.tolist()) & set(exact_M.tolist())) / 10)
    assert np.mean(recalls) > 0.9  # approximate, and nearly all of the way there


class _EmbeddingPolicy:
    """Scores candidates by <user_obs, embedding>; exposes its embeddings for faiss."""

    name = "emb"

    def __init__(self, emb_ND):
        self.emb_ND = emb_ND

    def item_embeddings(self):
        return self.emb_ND

    def recommend(self, observation, candidates, k):
        scores_N = self.emb_ND[candidates.ids] @ observation.user_obs
        top_K = np.argsort(-scores_N)[:k]
        return Slate(candidates.ids[top_K], scores_N[top_K], np.ones(k))


def test_requests_without_candidates_are_served_from_faiss_retrieval():
    rng = np.random.default_rng(2)
    emb_ND = rng.normal(size=(300, 4)).astype(np.float32)
    policy = _EmbeddingPolicy(emb_ND)
    host = PolicyHost(["emb"])
    host.swap("emb", 1, policy, index=CatalogueIndex(emb_ND, kind="flat"))
    config = ServeConfig(TrafficSplit.parse(["emb"]), retrieve_m=15)
    # Catalogue features of another width: retrieval uses the snapshot's learned embeddings.
    features_NF = rng.normal(size=(300, 3)).astype(np.float32)
    server = SlateServer(config, host, catalogue=ItemCatalogue(features_NF))
    obs = [[0.3, -1.0, 0.2, 0.5], [1.0, 0.0, 0.0, -0.1]]
    reqs = [_request(request_id=f"r{i}", observation=o, candidates=[], k=3)
            for i, o in enumerate(obs)]  # fmt: skip
    for req, slate in zip(reqs, server.serve_batch(reqs), strict=True):
        brute_N = emb_ND @ np.asarray(req.observation, dtype=np.float32)
        top_M = np.argsort(-brute_N, kind="stable")[:15]
        assert slate.candidates == top_M.tolist()
        assert slate.items == top_M[:3].tolist() and slate.policy_version == 1
    assert server.stats["retrieved"] == 2


def test_side_by_side_policies_tag_each_slate_with_its_policy():
    host = PolicyHost(["learned"])
    host.swap("learned", 7, _Recorder())
    split = TrafficSplit.parse(["learned=0.5", "random=0.5"])
    server = SlateServer(ServeConfig(split), host, catalogue=CATALOGUE)
    reqs = [_request(request_id=f"r{i}", user_id=f"user{i}") for i in range(400)]
    slates = server.serve_batch(reqs)
    for req, slate in zip(reqs, slates, strict=True):
        arm = split.arm(req.user_id)
        assert slate.policy == arm
        assert slate.policy_version == (7 if arm == "learned" else 0)
    learned = sum(s.policy == "learned" for s in slates)
    assert 150 < learned < 250  # half of 400 users, within about five standard errors
    again = server.serve_batch(reqs)
    assert [s.policy for s in again] == [s.policy for s in slates]
