"""Generation 1: decayed item CTR with Beta-prior smoothing, against hand-computed counts."""

from __future__ import annotations

import numpy as np
import pytest

from learners.ctr import CTRLearner
from learners.evaluate import xy_from_events
from streams.events import Event

NO_DECAY = 1e12


def test_no_decay_is_the_smoothed_ratio_of_counts():
    m = 10.0
    ctr = CTRLearner(half_life=NO_DECAY, prior_strength=m)
    stream = [("a", 1), ("a", 0), ("a", 1), ("b", 0), ("b", 0), ("c", 1)]
    for item, y in stream:
        ctr.learn_one({"item_id": item}, y)
    g = (3 + 1) / (6 + 2)  # global clicks/impressions, Laplace-smoothed
    expected = {"a": (2 + m * g) / (3 + m), "b": (0 + m * g) / (2 + m), "c": (1 + m * g) / (1 + m), "zzz": g}
    got = ctr.predict_proba_many([{"item_id": k} for k in expected])
    assert got == pytest.approx(list(expected.values()), rel=1e-9)


def test_event_count_half_life_halves_old_counts():
    m = 4.0
    ctr = CTRLearner(half_life=2.0, prior_strength=m)
    ctr.learn_one({"item_id": "a"}, 1)  # t = 1
    for _ in range(4):  # t = 2..5
        ctr.learn_one({"item_id": "b"}, 0)
    # now = 5: a's click is 4 events old (weight 1/4); b's are 3, 2, 1, 0 old
    wa = 0.5 ** (4 / 2)
    wb = [0.5 ** (k / 2) for k in (3, 2, 1, 0)]
    g = (wa + 1) / (wa + sum(wb) + 2)
    pa = (wa + m * g) / (wa + m)
    pb = (0 + m * g) / (sum(wb) + m)
    assert ctr.predict_proba_many([{"item_id": "a"}, {"item_id": "b"}]) == pytest.approx([pa, pb], rel=1e-9)


def test_event_time_decay_handles_out_of_order_events():
    m = 2.0
    h = 60.0
    ctr = CTRLearner(half_life=h, time_unit="seconds", prior_strength=m)
    events = [("a", 1, 1000.0), ("a", 0, 1120.0), ("b", 1, 1060.0), ("a", 1, 1030.0)]  # the last is late
    for item, y, t in events:
        ctr.learn_one({"item_id": item, "ctx:event_time": t}, y)
    now = 1120.0
    w = {t: 0.5 ** ((now - t) / h) for _, _, t in events}
    g = (w[1000.0] + w[1060.0] + w[1030.0] + 1) / (sum(w.values()) + 2)
    pa = (w[1000.0] + w[1030.0] + m * g) / (w[1000.0] + w[1120.0] + w[1030.0] + m)
    # b was last updated at 1060: its counts decay to `now` at prediction time
    pb = (w[1060.0] + m * g) / (w[1060.0] + m)
    assert ctr.predict_proba_many([{"item_id": "a"}, {"item_id": "b"}]) == pytest.approx([pa, pb], rel=1e-9)


def test_learn_many_equals_learn_one_with_event_time():
    rng = np.random.default_rng(3)
    xs = [{"item_id": f"i{rng.integers(8)}", "ctx:event_time": float(t)} for t in rng.uniform(0, 500, 400)]
    ys = rng.integers(0, 2, 400)
    one = CTRLearner(half_life=50, time_unit="seconds")
    many = CTRLearner(half_life=50, time_unit="seconds")
    for x, y in zip(xs, ys):
        one.learn_one(x, int(y))
    for start in range(0, 400, 64):
        many.learn_many(xs[start : start + 64], ys[start : start + 64])
    probe = [{"item_id": f"i{k}"} for k in range(10)]
    assert many.predict_proba_many(probe) == pytest.approx(one.predict_proba_many(probe), rel=1e-9)


def test_a_stale_item_drifts_back_to_the_global_ctr():
    ctr = CTRLearner(half_life=100, prior_strength=5)
    for _ in range(50):
        ctr.learn_one({"item_id": "hot"}, 1)
    fresh = ctr.predict_proba_one({"item_id": "hot"})
    for k in range(5000):
        ctr.learn_one({"item_id": f"cold{k % 7}"}, int(k % 10 == 0))
    stale = ctr.predict_proba_one({"item_id": "hot"})
    unseen = ctr.predict_proba_one({"item_id": "never"})
    assert fresh > 0.85
    assert stale == pytest.approx(unseen, abs=1e-3)


def test_examples_without_the_key_count_only_globally():
    ctr = CTRLearner(half_life=NO_DECAY, prior_strength=1)
    ctr.learn_many([{"user_id": "u"}, {"user_id": "u"}], [1, 1])
    assert ctr.predict_proba_one({"item_id": "x"}) == pytest.approx(3 / 4)


def test_seconds_mode_needs_the_time():
    ctr = CTRLearner(time_unit="seconds")
    with pytest.raises(ValueError, match="ctx:event_time"):
        ctr.learn_one({"item_id": "a"}, 1)


def test_xy_from_events_adds_event_time_for_the_ctr():
    e = Event(kind="impression", event_id="e", event_time=1234.5, user_id="u", request_id="r",
              item_id="i", label=1, position=0)
    req = Event(kind="request", event_id="q", event_time=1.0, user_id="u", request_id="r", k=5)
    xy = list(xy_from_events([req, e], time_key="ctx:event_time"))
    assert xy == [({"user_id": "u", "item_id": "i", "ctx:position": 0, "ctx:event_time": 1234.5}, 1)]


@pytest.mark.parametrize("bad", [{"half_life": 0}, {"time_unit": "hours"}, {"prior_strength": -1}])
def test_bad_parameters(bad):
    with pytest.raises(ValueError):
        CTRLearner(**bad)
