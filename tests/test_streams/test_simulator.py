"""The click simulator: deterministic, well-formed, and its planted structure is real."""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter, defaultdict

import numpy as np
import pytest

from streams.errors import ConfigError
from streams.events import decode_event, encode_event
from streams.simulator import ClickSimulator, SimulatorConfig

SMALL = SimulatorConfig(seed=3, n_users=300, n_items=200, slate_size=6, drift_every=2_000, new_item_rate=0.002)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula, ties given their average rank."""
    order = np.argsort(score, kind="mergesort")
    _, inverse, counts = np.unique(score[order], return_inverse=True, return_counts=True)
    mean_rank = np.bincount(inverse, weights=np.arange(1, len(score) + 1)) / counts
    ranks = np.empty(len(score))
    ranks[order] = mean_rank[inverse]
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_auc_helper_on_known_cases():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.75


def test_same_seed_gives_the_same_stream():
    a = [encode_event(e) for e in ClickSimulator(SMALL).events(max_events=6_000)]
    b = [encode_event(e) for e in ClickSimulator(SMALL).events(max_events=6_000)]
    assert a == b
    other = dataclasses.replace(SMALL, seed=4)
    c = [encode_event(e) for e in ClickSimulator(other).events(max_events=6_000)]
    assert c != a


def test_events_continue_the_stream_across_calls():
    whole = [encode_event(e) for e in ClickSimulator(SMALL).events(max_events=1_000)]
    sim = ClickSimulator(SMALL)
    parts = [encode_event(e) for e in sim.events(max_events=333)]
    parts += [encode_event(e) for e in sim.events(max_events=667)]
    assert parts == whole


def test_stream_structure_and_every_event_validates():
    sim = ClickSimulator(SMALL)
    events = list(sim.events(max_events=8_000))
    assert len(events) == 8_000
    assert len({e.event_id for e in events}) == len(events)
    times = [e.event_time for e in events]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert times[10] == pytest.approx(SMALL.start_time + 10 / SMALL.event_rate)
    for e in events:
        assert decode_event(encode_event(e)) == e

    by_request = defaultdict(list)
    for e in events:
        by_request[e.request_id].append(e)
    complete = list(by_request.values())[:-1]  # the last request may be cut by max_events
    assert len(complete) > 500
    for group in complete:
        kinds = [e.kind for e in group]
        s = SMALL.slate_size
        assert kinds[0] == "request" and group[0].k == s
        assert kinds[1 : s + 1] == ["impression"] * s
        assert all(k == "click" for k in kinds[s + 1 :])
        impressions = group[1 : s + 1]
        assert [e.position for e in impressions] == list(range(s))
        assert len({e.item_id for e in impressions}) == s, "a slate shows distinct items"
        assert len({e.user_id for e in group}) == 1
        clicked = {(e.item_id, e.position) for e in impressions if e.label == 1}
        assert {(e.item_id, e.position) for e in group[s + 1 :]} == clicked
        assert all(e.label == 1 for e in group[s + 1 :])
    some = next(e for e in events if e.kind == "impression")
    assert set(some.user_features) == {"age", "gender", "region", "activity"}
    assert set(some.item_features) == {"category", "tags", "price"}
    assert isinstance(some.item_features["tags"], tuple) and some.item_features["tags"]


@pytest.fixture(scope="module")
def impressions_with_truth():
    """~60k impressions of the default world (no drift), with the oracle's P(click) as logged."""
    sim = ClickSimulator(SimulatorConfig(seed=11, drift_every=None))
    impressions = []
    for e in sim.events():
        if e.kind == "impression":
            impressions.append(e)
            if len(impressions) == 60_000:
                break
    users = [e.user_id for e in impressions]
    items = [e.item_id for e in impressions]
    positions = np.array([e.position for e in impressions])
    truth = sim.true_click_probabilities(users, items, positions)
    relevance = sim.true_click_probabilities(users, items, np.zeros(len(impressions)))
    return impressions, truth, relevance


def _hashed_features(e, dim: int) -> list[int]:
    """Hashed one-hot: item id, category, and every user feature crossed with item features."""
    itf = e.item_features
    names = [f"item={e.item_id}", f"cat={itf['category']}"]
    for k, v in e.user_features.items():
        names += [f"{k}={v}", f"{k}={v}&cat={itf['category']}", f"{k}={v}&price={itf['price']}"]
        names += [f"{k}={v}&tag={t}" for t in itf["tags"]]
    return [zlib.crc32(n.encode()) % dim for n in names]


def test_planted_structure_is_learnable_and_the_oracle_bounds_it(impressions_with_truth):
    impressions, truth, relevance = impressions_with_truth
    y = np.array([e.label for e in impressions], dtype=float)
    dim = 1 << 18
    rows = [_hashed_features(e, dim) for e in impressions]
    width = max(map(len, rows))
    x = np.full((len(rows), width), dim)  # padded with a dummy slot whose weight stays 0
    for j, r in enumerate(rows):
        x[j, : len(r)] = r
    half = len(rows) // 2
    w, b, lr, batch = np.zeros(dim + 1), 0.0, 0.01, 32
    for _ in range(4):  # mini-batch SGD logistic regression, position-blind
        for s in range(0, half, batch):
            xb = x[s : s + batch]
            g = 1.0 / (1.0 + np.exp(-(b + w[xb].sum(axis=1)))) - y[s : s + batch]
            np.add.at(w, xb.ravel(), -lr * np.repeat(g, width))
            w[dim] = 0.0
            b -= lr * g.sum()
    scores = b + w[x[half:]].sum(axis=1)
    y_test = y[half:]
    model_auc = auc(y_test, scores)
    assert model_auc >= 0.60, f"features should predict clicks: AUC {model_auc:.3f}"
    # The planted truth is the upper bound: position-blind against position-blind, and in full.
    assert auc(y_test, relevance[half:]) > model_auc
    assert auc(y_test, truth[half:]) > model_auc


def test_ctr_in_range_and_position_bias(impressions_with_truth):
    impressions, truth, _ = impressions_with_truth
    labels = np.array([e.label for e in impressions])
    positions = np.array([e.position for e in impressions])
    ctr = labels.mean()
    assert 0.05 <= ctr <= 0.15, f"overall CTR {ctr:.3f}"
    ctr0, ctr4 = labels[positions == 0].mean(), labels[positions == 4].mean()
    assert ctr0 > 1.5 * ctr4, f"CTR at position 0 ({ctr0:.3f}) vs 4 ({ctr4:.3f})"
    # Clicks follow the logged truth: impressions the oracle rates high are clicked more.
    high = truth > np.quantile(truth, 0.9)
    low = truth < np.quantile(truth, 0.1)
    assert labels[high].mean() > 3 * labels[low].mean()


def _relevance_of(sim, pairs):
    return sim.true_click_probabilities([u for u, _ in pairs], [i for _, i in pairs], np.zeros(len(pairs)))


@pytest.mark.parametrize("drift", [True, False])
def test_drift_changes_the_truth_of_fixed_pairs(drift):
    cfg = SimulatorConfig(seed=5, n_users=300, n_items=200, new_item_rate=0.0,
                          drift_every=None, drift_at=(3_000,) if drift else ())
    sim = ClickSimulator(cfg)
    rng = np.random.default_rng(0)
    pairs = [(f"u{u}", f"i{i}") for u, i in zip(rng.integers(0, 300, 100), rng.integers(0, 200, 100))]
    before = last_before = None
    for n, e in enumerate(sim.events(max_events=4_000)):
        if n == 2_900:
            assert sim.drift_points == []
            before = _relevance_of(sim, pairs)
        if not sim.drift_points:
            last_before = e
    after = _relevance_of(sim, pairs)
    if not drift:
        assert sim.drift_points == []
        np.testing.assert_array_equal(after, before)
        return
    (point,) = sim.drift_points
    assert 3_000 <= point.event_count < 3_000 + 2 * (1 + 2 * cfg.slate_size)
    assert point.event_time == pytest.approx(cfg.start_time + point.event_count / cfg.event_rate)
    # The last event generated before the drift is the one just before the drift point.
    assert last_before.event_time == pytest.approx(cfg.start_time + (point.event_count - 1) / cfg.event_rate)
    change = np.abs(after - before)
    assert change.mean() > 0.01 and (change > 1e-6).mean() > 0.9


def test_periodic_drift_points():
    cfg = SimulatorConfig(seed=1, n_users=100, n_items=80, drift_every=1_500)
    sim = ClickSimulator(cfg)
    for _ in sim.events(max_events=7_000):
        pass
    counts = [p.event_count for p in sim.drift_points]
    assert len(counts) == 4
    for k, n in enumerate(counts, 1):
        assert k * 1_500 <= n < k * 1_500 + 2 * (1 + 2 * cfg.slate_size)


def test_new_items_arrive_mid_stream():
    cfg = SimulatorConfig(seed=2, n_users=300, n_items=200, new_item_rate=0.002, drift_every=None)
    sim = ClickSimulator(cfg)
    first_seen: dict[str, float] = {}
    for e in sim.events(max_events=20_000):
        if e.kind == "impression":
            first_seen.setdefault(e.item_id, e.event_time)
    initial = {f"i{j}" for j in range(cfg.n_items)}
    new = {i: t for i, t in first_seen.items() if i not in initial}
    assert len(new) >= 10
    assert sim.n_items > cfg.n_items
    assert sim.new_item_first_seen == new
    assert min(new.values()) > cfg.start_time + 100 / cfg.event_rate, "arrivals come after the stream started"
    some = next(iter(new))
    assert set(sim.item_features(some)) == {"category", "tags", "price"}
    assert 0.0 < sim.true_click_probability("u0", some) < 1.0


def test_no_new_items_when_the_rate_is_zero():
    cfg = SimulatorConfig(seed=2, n_users=100, n_items=50, new_item_rate=0.0)
    sim = ClickSimulator(cfg)
    items = {e.item_id for e in sim.events(max_events=3_000) if e.item_id}
    assert sim.n_items == 50 and sim.new_item_first_seen == {}
    assert items <= {f"i{j}" for j in range(50)}


@pytest.mark.parametrize("bad", [
    {"slate_size": 500, "n_items": 100},
    {"explore_fraction": 0.8, "fresh_fraction": 0.3},
    {"n_users": 0},
    {"drift_every": 0},
    {"event_rate": 0.0},
    {"target_ctr": 0.0},
])
def test_invalid_configuration_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        SimulatorConfig(**bad)


def test_unreachable_ctr_is_a_config_error():
    with pytest.raises(ConfigError, match="out of reach"):
        ClickSimulator(SimulatorConfig(n_users=50, n_items=50, target_ctr=0.9))


def test_unknown_ids_are_key_errors():
    sim = ClickSimulator(SimulatorConfig(n_users=10, n_items=20, slate_size=5))
    with pytest.raises(KeyError, match="u10"):
        sim.true_click_probability("u10", "i0")
    with pytest.raises(KeyError, match="item"):
        sim.true_click_probability("u0", "x1")


def test_base_logit_given_is_used_and_shifts_the_ctr():
    cfg = SimulatorConfig(seed=1, n_users=200, n_items=100, drift_every=None, new_item_rate=0.0)
    low = ClickSimulator(dataclasses.replace(cfg, base_logit=-4.0))
    high = ClickSimulator(dataclasses.replace(cfg, base_logit=0.0))
    assert low.base_logit == -4.0
    clicks = [Counter(e.kind for e in s.events(max_events=5_000))["click"] for s in (low, high)]
    assert clicks[0] < clicks[1]
