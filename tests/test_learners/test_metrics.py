"""ROC AUC and prequential metrics, checked against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learners.metrics import PrequentialMetrics, as_labels, log_loss, roc_auc


def brute_auc(y: np.ndarray, p: np.ndarray) -> float:
    """P(p_pos > p_neg) + 0.5 P(tie) over every (positive, negative) pair."""
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


def brute_logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    total = 0.0
    for yi, pi in zip(y, p):
        q = min(max(pi, eps), 1 - eps)
        total += -math.log(q) if yi == 1 else -math.log(1 - q)
    return total / len(y)


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    # coarse rounding makes many ties, within and across classes
    p = np.round(rng.random(n) * 0.5 + 0.3 * y, decimals=int(rng.integers(1, 3)))
    assert roc_auc(y, p) == pytest.approx(brute_auc(y, p), abs=1e-12)


def test_roc_auc_extremes_and_single_class():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.full(4, 0.7)) == 0.5
    assert math.isnan(roc_auc(np.ones(5), np.linspace(0, 1, 5)))
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.5])


def test_cumulative_auc_within_its_reported_bound_of_the_exact_value():
    rng = np.random.default_rng(1)
    m = PrequentialMetrics(window=1000)
    ys, ps = [], []
    for size in (1, 7, 300, 1024, 5000, 13):
        y = rng.integers(0, 2, size)
        p = 1 / (1 + np.exp(-(rng.normal(size=size) + 1.2 * y - 1.0)))
        if size > 100:
            p[:10] = 0.0  # exact zeros and ones are binned too
            p[10:20] = 1.0
        m.update(y, p)
        ys.append(y)
        ps.append(p)
    y, p = np.concatenate(ys), np.concatenate(ps)
    s = m.snapshot()
    exact = brute_auc(y, p)
    assert s["auc_max_error"] < 2e-3
    assert abs(s["auc"] - exact) <= s["auc_max_error"] + 1e-12
    assert s["n"] == len(y)
    assert s["clicks"] == int(y.sum())
    assert s["ctr"] == pytest.approx(y.mean())
    assert s["logloss"] == pytest.approx(brute_logloss(y, p), rel=1e-9)


def test_rolling_values_cover_exactly_the_last_window_events():
    rng = np.random.default_rng(2)
    m = PrequentialMetrics(window=250)
    ys, ps = [], []
    for size in (100, 100, 77, 400, 3, 60):  # crosses the ring boundary, and one batch > window
        y = rng.integers(0, 2, size)
        p = np.clip(rng.random(size) * 0.7 + 0.3 * y, 0, 1)
        m.update(y, p)
        ys.append(y)
        ps.append(p)
        y_all, p_all = np.concatenate(ys), np.concatenate(ps)
        s = m.snapshot()
        last = slice(-250, None)
        assert s["rolling_n"] == min(len(y_all), 250)
        assert s["rolling_auc"] == pytest.approx(brute_auc(y_all[last], p_all[last]), abs=1e-12)
        assert s["rolling_logloss"] == pytest.approx(brute_logloss(y_all[last], p_all[last]), rel=1e-9)


def test_logloss_is_clipped():
    m = PrequentialMetrics(eps=1e-5)
    m.update(np.array([1, 0]), np.array([0.0, 1.0]))
    assert m.snapshot()["logloss"] == pytest.approx(-math.log(1e-5))
    assert log_loss(np.array([1, 0]), np.array([0.0, 1.0]), eps=1e-5) == pytest.approx(-math.log(1e-5))


def test_events_per_second_uses_the_injected_clock():
    now = [100.0]
    m = PrequentialMetrics(clock=lambda: now[0])
    m.update(np.array([0, 1, 0, 0]), np.full(4, 0.3))
    now[0] = 102.0
    s = m.snapshot()
    assert s["elapsed_s"] == 2.0
    assert s["events_per_s"] == 2.0


def test_empty_snapshot_and_reset():
    m = PrequentialMetrics()
    s = m.snapshot()
    assert s["n"] == 0 and s["rolling_n"] == 0
    assert math.isnan(s["auc"]) and math.isnan(s["logloss"]) and math.isnan(s["rolling_auc"])
    m.update(np.array([0, 1]), np.array([0.2, 0.9]))
    m.update(np.zeros(0), np.zeros(0))
    assert m.snapshot()["n"] == 2
    m.reset()
    assert m.snapshot()["n"] == 0


@pytest.mark.parametrize(
    ("y", "p"),
    [
        ([0, 1], [0.5]),  # lengths differ
        ([0, 2], [0.5, 0.5]),  # a label that is not 0/1
        ([0, 1], [0.5, 1.5]),  # not a probability
        ([0, 1], [0.5, float("nan")]),
    ],
)
def test_update_rejects_bad_input(y, p):
    m = PrequentialMetrics()
    with pytest.raises(ValueError):
        m.update(np.array(y), np.array(p))
    assert m.snapshot()["n"] == 0


def test_as_labels():
    assert as_labels([True, 0, 1]).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 labels for 3"):
        as_labels([0, 1], 3)
