"""``recloop bench serve``'s in-process parts: its catalogue, its policy, its recall figure."""

from __future__ import annotations

import numpy as np

from recloop.bench.serve import BenchConfig, DotPolicy, _compute_only, _recall, item_catalogue
from recloop.core.events import PolicyPublished
from recloop.serving.items import ServedCatalogue, index_catalogue
from recloop.serving.retrieval import CatalogueIndex


def test_the_bench_catalogue_is_seeded_unit_vectors():
    a, b = item_catalogue(500, 8, seed=3), item_catalogue(500, 8, seed=3)
    assert a.sha256 == b.sha256 and a.version == 1
    np.testing.assert_allclose(np.linalg.norm(a.features_NF, axis=1), 1.0, rtol=1e-5)


def test_recall_is_measured_against_brute_force_and_the_core_is_timed():
    catalogue = item_catalogue(3000, 8, seed=4)
    queries_QD = np.random.default_rng(5).normal(size=(50, 8)).astype(np.float32)
    exact = index_catalogue(catalogue, kind="flat", recall_m=20)
    assert _recall(catalogue, exact, queries_QD, 20) == 1.0
    shallow = CatalogueIndex(catalogue.features_NF, kind="ivf", recall_m=20, recall_target=0.3)
    approx = ServedCatalogue(catalogue, shallow)  # probes only what recall 0.3 needs
    assert 0.3 < _recall(catalogue, approx, queries_QD, 20) < 1.0

    published = PolicyPublished(policy="bench", algorithm="dot", version=1, path="x",
                                weights_sha256="", manifest_sha256="", created_ts=0.0)  # fmt: skip
    bench = BenchConfig(n_items=3000, dim=8, m=20, compute_samples=20)
    timed = _compute_only(bench, exact, published, queries_QD)
    assert all(np.isfinite(timed[key]).all() for key in ("compute", "encode", "faiss"))


def test_the_dot_policy_ranks_candidates_by_their_catalogue_features():
    from recloop.core.ports import Candidates, Observation

    features_NF = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], np.float32)
    obs = Observation(user_id="u", user_obs=np.array([1.0, 0.2], np.float32))
    slate = DotPolicy().recommend(obs, Candidates(np.array([4, 9, 2]), features_NF), 2)
    assert slate.items.tolist() == [4, 2]


def test_the_default_bench_catalogue_is_the_large_catalogue_world_s_with_its_users():
    from recloop.bench.serve import bench_catalogue
    from recloop.producer_sim.presets import large_catalogue

    catalogue, queries_QD = bench_catalogue(BenchConfig(n_items=2000, dim=8, seed=1))
    world = large_catalogue(1, n_items=2000, dim=8)
    assert catalogue.sha256 == world.item_catalogue.sha256  # the world's clustered items
    assert queries_QD.shape == (4096, 8)
    np.testing.assert_allclose(np.linalg.norm(queries_QD, axis=1), 1.0, rtol=1e-5)
    random, _ = bench_catalogue(BenchConfig(n_items=2000, dim=8, seed=1, catalogue="random"))
    assert random.sha256 == item_catalogue(2000, 8, 1).sha256
