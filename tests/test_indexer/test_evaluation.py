"""Retrieval evaluation of a published index: served vs exact vs popularity, real FAISS."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from indexer.artifacts import ArtifactStore
from indexer.build import BuildConfig
from indexer.catalogue import Catalogue
from indexer.errors import IndexerError
from indexer.evaluation import RetrievalEvaluator, clicks_by_user, evaluate_retrieval, topk_by_score
from indexer.follow import RecentWindow
from indexer.prometheus import IndexerStatsCollector
from indexer.service import IndexerService
from indexer.testing import FakeCheckpointSource, FakeTwoTower, catalogue_records, labelled_impressions


def _unit(rows: list[list[float]]) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ivf_two_cells() -> tuple[faiss.Index, np.ndarray, list[str]]:
    """An IVF index with cells around (1, 0) and (0, 1), searched with nprobe=1.

    Item a = (1, 0) lies in cell 0; item b = (0.6, 0.8) in cell 1. The query (0.8, 0.6)
    is nearer cell 0, so the served index sees only a (score 0.8) while exact search
    ranks b first (score 0.96).
    """
    centroids = _unit([[1, 0], [0, 1]])
    quantizer = faiss.IndexFlatIP(2)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, 2, 2, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    vectors = _unit([[1, 0], [0.6, 0.8]])
    index.add(vectors)
    index.nprobe = 1
    return index, vectors, ["a", "b"]


def test_the_ann_loss_shows_apart_from_exact_search() -> None:
    index, vectors, ids = _ivf_two_cells()
    users = _unit([[0.8, 0.6]])
    report = evaluate_retrieval(users, [{"b"}], vectors, ids, index=index, ks=(1, 2))
    assert report.users == 1
    assert report.metrics["flat"]["recall@1"] == 1.0
    assert report.metrics["served"]["recall@1"] == 0.0  # b sits in the cell nprobe=1 skips
    # At K=2 exact search still has b first; the served list has only a (b is never probed)
    assert report.metrics["flat"]["ndcg@2"] == 1.0
    assert report.metrics["served"]["hr@2"] == 0.0


def test_flat_index_matches_exact_search_and_hand_computed_metrics() -> None:
    vectors = _unit([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]])
    ids = ["w", "x", "y", "z"]
    index = faiss.IndexFlatIP(2)
    index.add(vectors)
    # user 1 looks along (1, 0): order w, x, y, z; user 2 along (0, 1): y, x, w|z tie
    users = _unit([[1, 0], [0, 1]])
    relevant = [{"x", "z"}, {"y"}]
    report = evaluate_retrieval(users, relevant, vectors, ids, index=index, ks=(1, 2))
    for search in ("served", "flat"):
        m = report.metrics[search]
        assert m["recall@1"] == pytest.approx((0 + 1) / 2)
        assert m["recall@2"] == pytest.approx((0.5 + 1) / 2)
        assert m["hr@2"] == 1.0
        # user 1: hit at rank 1 (0-based), IDCG over 2 hits; user 2: hit at rank 0
        ndcg_u1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
        assert m["ndcg@2"] == pytest.approx((ndcg_u1 + 1.0) / 2)


def test_popularity_ranks_by_clicks_with_ties_to_the_lower_position() -> None:
    vectors = _unit([[1, 0], [0, 1], [1, 1]])
    ids = ["a", "b", "c"]
    users = _unit([[1, 0], [0, 1]])
    # popularity list: c (5), then a and b tied at 2 -> a (position 0) before b
    report = evaluate_retrieval(users, [{"a"}, {"b"}], vectors, ids,
                                popularity={"c": 5, "a": 2, "b": 2}, ks=(1, 2))
    pop = report.metrics["popularity"]
    assert pop["hr@1"] == 0.0
    assert pop["recall@2"] == pytest.approx(0.5)  # a found, b missed
    assert "served" not in report.metrics  # no index given


def test_exact_topk_breaks_ties_by_item_position() -> None:
    scores = np.array([[0.2, 0.7, 0.7, 0.7, 0.1]])
    assert topk_by_score(scores, 2).tolist() == [[1, 2]]
    assert topk_by_score(scores, 10).shape == (1, 5)  # k beyond the catalogue: every item once


def test_users_without_a_held_out_click_are_not_evaluated() -> None:
    xs = [{"user_id": "u", "item_id": "a"}, {"user_id": "v", "item_id": "b"}, {"user_id": "u", "item_id": "a"}]
    users, relevant = clicks_by_user(xs, np.array([1, 0, 1]))
    assert [x["user_id"] for x in users] == ["u"]
    assert relevant == [{"a"}]  # a duplicate click counts once
    empty = evaluate_retrieval(np.zeros((0, 2)), [], _unit([[1, 0]]), ["a"])
    assert empty.users == 0 and empty.metrics == {}


def test_bad_input_names_what_is_wrong() -> None:
    with pytest.raises(IndexerError, match="2 user vectors but 1 relevant"):
        evaluate_retrieval(_unit([[1, 0], [0, 1]]), [{"a"}], _unit([[1, 0]]), ["a"])
    with pytest.raises(IndexerError, match="one id per vector"):
        evaluate_retrieval(_unit([[1, 0]]), [{"a"}], _unit([[1, 0]]), ["a", "b"])
    with pytest.raises(IndexerError, match="one label per example"):
        clicks_by_user([{"user_id": "u"}], np.array([1, 0]))


def test_window_popularity_counts_only_what_the_checkpoint_learned() -> None:
    w = RecentWindow()
    for off, (item, y) in enumerate([("a", 1), ("a", 1), ("b", 0), ("b", 1), ("c", 1)]):
        w.add("ev", 0, off, {"user_id": "u", "item_id": item}, y)
    assert w.learned_clicks({"ev": {0: 3}}) == {"a": 2}
    assert w.learned_clicks({}) == {}  # nothing learned yet


def test_service_measures_each_published_version_and_exports_gauges(tmp_path) -> None:
    n_items = 400
    catalogue = Catalogue()
    for r in catalogue_records(n_items):
        catalogue.observe_record(r)
    xs, ys = labelled_impressions(3000, n_items=n_items, seed=2, flip=0.0)
    service = IndexerService(
        ArtifactStore(tmp_path), catalogue, FakeCheckpointSource(FakeTwoTower()),
        build_config=BuildConfig(flat_threshold=1000, recall_k=20, probe_queries=50),
        held_out=lambda model: (xs, ys),
        retrieval=RetrievalEvaluator(ks=(10, 50), popularity=lambda offsets: {"i0": 9}),
    )
    outcome = service.build_once()
    assert outcome.status == "published"
    report = service.metrics.retrieval
    assert report["version"] == outcome.version
    n_clickers = len({x["user_id"] for x, y in zip(xs, ys) if y == 1})
    assert report["users"] == n_clickers
    m = report["metrics"]
    assert set(m) == {"served", "flat", "popularity"}
    assert m["served"] == m["flat"]  # a flat index is exact search
    # The fake towers put users and items of one topic together, so the model beats a
    # single popular item by a wide margin (each user clicks items of its own topic).
    assert m["flat"]["recall@50"] > m["popularity"]["recall@50"]
    for values in m.values():
        for key, v in values.items():
            assert 0.0 <= v <= 1.0, key

    reg = CollectorRegistry()
    reg.register(IndexerStatsCollector(service))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    samples = {(s.labels["metric"], s.labels["k"], s.labels["search"]): s.value
               for s in families["towerstream_index_retrieval"].samples}
    assert len(samples) == 3 * 2 * 3  # metric x k x search: low cardinality
    assert samples[("recall", "50", "served")] == pytest.approx(m["served"]["recall@50"])
    assert samples[("ndcg", "10", "popularity")] == pytest.approx(m["popularity"]["ndcg@10"])
    assert families["towerstream_index_retrieval_users"].samples[0].value == n_clickers
    assert families["towerstream_index_retrieval_version"].samples[0].value == outcome.version


def test_a_version_without_held_out_clicks_keeps_the_last_measurement(tmp_path) -> None:
    catalogue = Catalogue()
    for r in catalogue_records(300):
        catalogue.observe_record(r)
    xs, ys = labelled_impressions(1000, n_items=300, seed=3, flip=0.0)
    window = {"rows": (xs, ys)}
    source = FakeCheckpointSource(FakeTwoTower())
    service = IndexerService(
        ArtifactStore(tmp_path), catalogue, source,
        build_config=BuildConfig(flat_threshold=1000, recall_k=20, probe_queries=50),
        held_out=lambda model: window["rows"], retrieval=RetrievalEvaluator(ks=(10,)),
    )
    first = service.build_once()
    assert first.status == "published" and service.metrics.retrieval["version"] == first.version
    window["rows"] = ([], np.zeros(0, dtype=np.int64))  # the learner caught up: nothing held out
    source.bump(FakeTwoTower(noise=0.31))
    second = service.build_once()
    assert second.status == "published" and second.version != first.version
    assert service.metrics.retrieval["version"] == first.version  # not replaced by an empty measurement


def test_no_retrieval_gauges_before_a_measurement(tmp_path) -> None:
    service = IndexerService(ArtifactStore(tmp_path), Catalogue(), FakeCheckpointSource(FakeTwoTower()))
    reg = CollectorRegistry()
    reg.register(IndexerStatsCollector(service))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    assert families["towerstream_index_retrieval"].samples == []
