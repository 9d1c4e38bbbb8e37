"""Index choice, recall tuning and centroid reuse on clustered (mixture-of-Gaussians) vectors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.build import BuildConfig, build_index, exact_topk, recall_at_k
from indexer.errors import BuildError
from indexer.testing import mixture_of_gaussians

N, D = 12_000, 32


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return mixture_of_gaussians(N, dim=D, n_clusters=200, spread=0.8, seed=1)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return mixture_of_gaussians(200, dim=D, n_clusters=200, spread=0.8, seed=2)


def _per_query(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)])


def _recall(index: faiss.Index, queries: np.ndarray, vectors: np.ndarray, k: int) -> float:
    """Recall computed here, independently of the build's own number."""
    _, found = index.search(queries, k)
    _, truth = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    return recall_at_k(found, truth)


def _recall_lower_bound(index: faiss.Index, queries: np.ndarray, vectors: np.ndarray, k: int) -> float:
    """One-sided 95 % lower confidence bound of the mean per-query recall."""
    _, found = index.search(queries, k)
    _, truth = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    r = _per_query(found, truth)
    return float(r.mean() - 1.645 * r.std(ddof=1) / np.sqrt(len(r)))


def test_small_catalogues_get_an_exact_index(vectors, queries) -> None:
    r = build_index(vectors[:500], BuildConfig(flat_threshold=1000, recall_k=20), queries=queries)
    assert r.kind == "flat" and r.recall == 1.0
    _, labels = r.index.search(queries, 20)
    brute = np.argsort(-(queries @ vectors[:500].T), axis=1)[:, :20]
    assert (np.sort(labels, axis=1) == np.sort(brute, axis=1)).mean() > 0.99  # ties aside


def test_ivf_reaches_the_recall_target_with_the_smallest_nprobe(vectors, queries) -> None:
    # The target holds for the lower confidence bound of the probe recall, so that it
    # also holds on unseen queries; nprobe is the smallest value for which it does.
    cfg = BuildConfig(flat_threshold=1000, recall_k=50, recall_target=0.95, nlist=64)
    r = build_index(vectors, cfg, queries=queries)
    assert r.kind == "ivf_flat" and r.retrained
    nprobe = r.params["nprobe"]
    assert _recall_lower_bound(r.index, queries, vectors, 50) >= 0.95
    assert r.recall == pytest.approx(_recall(r.index, queries, vectors, 50))
    assert nprobe > 1
    faiss.extract_index_ivf(r.index).nprobe = nprobe - 1
    assert _recall_lower_bound(r.index, queries, vectors, 50) < 0.95


def test_centroids_are_reused_until_a_retrain_is_due(vectors, queries) -> None:
    cfg = BuildConfig(flat_threshold=1000, recall_k=20, retrain_every=3)
    first = build_index(vectors, cfg, queries=queries)
    second = build_index(vectors[:11_000], cfg, trained=first.trained, queries=queries)
    assert not second.retrained and second.drift is not None and second.drift < cfg.drift_threshold
    c1 = faiss.extract_index_ivf(first.index).quantizer.reconstruct_n(0, first.params["nlist"])
    c2 = faiss.extract_index_ivf(second.index).quantizer.reconstruct_n(0, second.params["nlist"])
    assert np.array_equal(c1, c2)
    assert _recall(second.index, queries, vectors[:11_000], 20) >= 0.95
    third = build_index(vectors, cfg, trained=second.trained, queries=queries)
    assert not third.retrained
    fourth = build_index(vectors, cfg, trained=third.trained, queries=queries)  # 3 builds on one training
    assert fourth.retrained and "periodic" in fourth.retrain_reason


def test_drifted_vectors_trigger_a_retrain(vectors, queries) -> None:
    cfg = BuildConfig(flat_threshold=1000, recall_k=20)
    first = build_index(vectors, cfg, queries=queries)
    moved = mixture_of_gaussians(N, dim=D, n_clusters=200, spread=0.8, seed=1, centres_seed=9)
    second = build_index(moved, cfg, trained=first.trained)
    assert second.retrained and "drifted" in second.retrain_reason and second.drift > cfg.drift_threshold


def test_growth_triggers_a_retrain(vectors) -> None:
    cfg = BuildConfig(flat_threshold=1000, recall_k=10, growth_retrain=2.0)
    first = build_index(vectors[:4000], cfg)
    second = build_index(vectors, cfg, trained=first.trained)
    assert second.retrained and "grew" in second.retrain_reason


def test_ivf_pq_and_hnsw_build_and_meet_the_target(vectors, queries) -> None:
    small = vectors[:3000]
    for cfg in (BuildConfig(kind="ivf_pq", pq_m=8, pq_nbits=6, pq_refine=16, recall_k=10, nlist=32),
                BuildConfig(kind="hnsw", hnsw_m=8, recall_k=10)):
        r = build_index(small, cfg, queries=queries)
        assert _recall(r.index, queries, small, 10) >= 0.95, cfg.kind


def test_bad_vectors_are_refused_with_a_clear_error() -> None:
    v = np.ones((10, 4), dtype=np.float32)
    v[3, 1] = np.nan
    with pytest.raises(BuildError, match="NaN"):
        build_index(v)
    with pytest.raises(BuildError, match="shape"):
        build_index(np.zeros((0, 4), dtype=np.float32))


def test_the_predicted_recall_curve_matches_measured_recall(vectors, queries) -> None:
    from indexer.build import ivf_recall_curve

    r = build_index(vectors, BuildConfig(flat_threshold=1000, recall_k=20, nlist=64), queries=queries)
    truth = exact_topk(queries, vectors, 20)
    curves = ivf_recall_curve(r.index, vectors, queries, truth, upper=64)
    assert curves.shape == (len(queries), 64)
    ivf = faiss.extract_index_ivf(r.index)
    for p in (1, 3, 8, 20):
        ivf.nprobe = p
        _, found = r.index.search(queries, 20)
        measured = _per_query(found, truth)
        assert np.abs(curves[:, p - 1] - measured).max() <= 0.05  # score ties at the K-th place aside
        assert curves[:, p - 1].mean() == pytest.approx(measured.mean(), abs=0.002)
    assert curves[:, -1].mean() == pytest.approx(1.0)
