"""Recall@K, HR@K, NDCG@K on small cases computed by hand."""

from __future__ import annotations

import math

import pytest

from learners.ranking_metrics import hit_rate_at_k, ndcg_at_k, recall_at_k, retrieval_metrics


def test_recall_and_hit_rate_by_hand():
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, {"b", "d", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, {"b", "d", "z"}, 4) == pytest.approx(2 / 3)
    assert hit_rate_at_k(ranked, {"d"}, 3) == 0.0
    assert hit_rate_at_k(ranked, {"d"}, 4) == 1.0
    assert recall_at_k(ranked, {"a"}, 10) == 1.0  # K longer than the list


def test_ndcg_by_hand():
    # hits at ranks 1 and 3 (0-based): DCG = 1/log2(3) + 1/log2(5); two relevant: IDCG = 1 + 1/log2(3)
    want = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["x", "r1", "y", "r2"], {"r1", "r2"}, 4) == pytest.approx(want)
    assert ndcg_at_k(["r1", "r2", "x"], {"r1", "r2"}, 3) == pytest.approx(1.0)
    # more relevant items than K: IDCG counts only K hits
    assert ndcg_at_k(["r1", "x"], {"r1", "r2", "r3"}, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_ties_keep_the_given_order():
    # two items tied in score: the ranker's order decides, and the metrics follow it
    assert ndcg_at_k(["tie1", "tie2"], {"tie2"}, 1) == 0.0
    assert ndcg_at_k(["tie2", "tie1"], {"tie2"}, 1) == 1.0


def test_users_without_relevant_items_are_left_out_of_the_means():
    assert math.isnan(recall_at_k(["a"], set(), 1))
    out = retrieval_metrics([["a", "b"], ["c", "d"], ["e"]], [{"b"}, set(), {"z"}], ks=(1, 2))
    assert out["users"] == 2
    assert out["recall@1"] == 0.0 and out["recall@2"] == pytest.approx(0.5)
    assert out["hr@2"] == pytest.approx(0.5)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    empty = retrieval_metrics([["a"]], [set()], ks=(1,))
    assert empty["users"] == 0 and math.isnan(empty["recall@1"])
    with pytest.raises(ValueError):
        recall_at_k(["a"], {"a"}, 0)
