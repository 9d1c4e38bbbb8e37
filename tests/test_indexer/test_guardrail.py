"""The guardrail's AUC and its accept/refuse rules."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from indexer.guardrail import Guardrail, GuardrailConfig, retrieval_auc, roc_auc
from indexer.testing import FakeTwoTower, labelled_impressions


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pair_counting_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.integers(0, 2, size=60)
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))


def test_roc_auc_is_undefined_for_one_class() -> None:
    assert roc_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None


def test_retrieval_auc_separates_a_good_model_from_a_broken_one() -> None:
    xs, ys = labelled_impressions(2000, seed=1)
    good = retrieval_auc(FakeTwoTower(), xs, ys)
    broken = retrieval_auc(FakeTwoTower(broken=True), xs, ys)
    assert good is not None and broken is not None
    assert good > 0.7 and abs(broken - 0.5) < 0.1


def test_refusals_are_counted_by_reason() -> None:
    g = Guardrail(GuardrailConfig(min_recall=0.9, max_recall_drop=0.02, max_auc_drop=0.02, max_item_loss=0.5))
    served = {"recall": 0.97, "auc": 0.80, "item_count": 1000}
    assert g.check({"recall": 0.96, "auc": 0.79, "item_count": 1000}, served).accepted
    d = g.check({"recall": 0.80, "auc": 0.60, "item_count": 100}, served)
    assert not d.accepted and len(d.reasons) == 3
    assert not g.check({"recall": 0.94, "auc": 0.80, "item_count": 1000}, served).accepted  # recall drop 0.03
    assert not g.check({"finite": False, "item_count": 1000}, None).accepted
    assert g.refused_total == 3 and g.accepted_total == 1
    assert g.refusals == {"recall": 2, "auc": 1, "item_count": 1, "non_finite": 1}


def test_first_build_faces_only_the_absolute_floors() -> None:
    g = Guardrail(GuardrailConfig(min_recall=0.9, min_auc=0.55))
    assert g.check({"recall": 0.95, "auc": 0.6, "item_count": 10}, None).accepted
    assert not g.check({"recall": 0.95, "auc": 0.5, "item_count": 10}, None).accepted
