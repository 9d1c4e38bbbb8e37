"""Online evaluation: the impression/click join by request id within a window, per learner."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from serving.metrics import Metrics
from serving.online_eval import OnlineEvalConfig, OnlineEvaluator
from serving.scorer import ModelHandle, StaticLearnerSource
from streams.events import Event


class Table:
    """predict_proba_many from a fixed item -> probability table."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def predict_proba_many(self, xs: Any) -> np.ndarray:
        return np.array([self.table[x["item_id"]] for x in xs])


def imp(rid: str, item: str, t: float) -> Event:
    return Event(kind="impression", event_id=f"i-{rid}-{item}", event_time=t, user_id="u1", request_id=rid,
                 item_id=item, label=0, position=0)


def click(rid: str, item: str, t: float, n: int = 0) -> Event:
    return Event(kind="click", event_id=f"c-{rid}-{item}-{n}", event_time=t, user_id="u1", request_id=rid,
                 item_id=item, label=1, position=0)


def feed(ev: OnlineEvaluator, events: list[Event]) -> None:
    for e in events:  # one partition, in order: the watermark is each event's time
        ev.observe(e)
        ev.advance(e.event_time)


def test_clicks_within_the_window_label_their_impressions() -> None:
    model = ModelHandle(Table({"a": 0.9, "b": 0.6, "c": 0.4, "d": 0.2}), "tt", 1)
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=10))
    ev.record_served("r1", model)
    # Clicked: a (0.9) and c (0.4); not clicked: b (0.6), d (0.2).
    # Pairs (pos, neg): (a,b) ok, (a,d) ok, (c,b) wrong, (c,d) ok -> AUC 3/4.
    feed(ev, [imp("r1", x, 100.0) for x in "abcd"] + [click("r1", "a", 101.0), click("r1", "c", 109.0)])
    assert ev.results() == {}  # nothing final before the window closes
    ev.advance(111.0)
    r = ev.results()["tt"]
    assert r["auc"] == pytest.approx(0.75)
    assert r["n"] == 4 and r["ctr"] == 0.5
    expected_ll = -np.mean(np.log([0.9, 1 - 0.6, 0.4, 1 - 0.2]))
    assert r["logloss"] == pytest.approx(expected_ll)
    assert ev.stats()["clicks"] == {"joined": 2, "late": 0, "unmatched": 0, "duplicate": 0}


def test_late_clicks_are_counted_and_never_change_a_label() -> None:
    model = ModelHandle(Table({"a": 0.9, "b": 0.1}), "tt", 1)
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5))
    ev.record_served("r1", model)
    feed(ev, [imp("r1", "a", 0.0), imp("r1", "b", 0.0), click("r1", "a", 1.0)])
    feed(ev, [click("r1", "b", 7.0)])  # b still pending, but 7 s after it: outside the window
    ev.advance(20.0)
    feed(ev, [click("r1", "b", 30.0)])  # after finalisation
    stats = ev.stats()
    assert stats["clicks"]["late"] == 2
    assert stats["clicks"]["joined"] == 1
    r = ev.results()["tt"]
    assert r["ctr"] == 0.5 and r["auc"] == 1.0  # b stays a negative


def test_click_without_impression_is_unmatched_once_the_window_passes() -> None:
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5))
    feed(ev, [click("r9", "z", 10.0)])
    assert ev.stats()["clicks"]["unmatched"] == 0
    ev.advance(16.0)
    assert ev.stats()["clicks"]["unmatched"] == 1


def test_a_click_arriving_before_its_impression_still_joins() -> None:
    model = ModelHandle(Table({"a": 0.7, "b": 0.3}), "tt", 1)
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5))
    ev.record_served("r1", model)
    feed(ev, [click("r1", "a", 2.0), imp("r1", "a", 1.0), imp("r1", "b", 1.0)])
    ev.flush()
    assert ev.stats()["clicks"]["joined"] == 1
    assert ev.results()["tt"]["ctr"] == 0.5


def test_duplicates_are_counted_once() -> None:
    model = ModelHandle(Table({"a": 0.7, "b": 0.3}), "tt", 1)
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5))
    ev.record_served("r1", model)
    feed(ev, [imp("r1", "a", 0.0), imp("r1", "a", 0.0), imp("r1", "b", 0.0),
              click("r1", "a", 1.0), click("r1", "a", 1.5, n=1)])
    ev.flush()
    assert ev.stats()["clicks"] == {"joined": 1, "late": 0, "unmatched": 0, "duplicate": 1}
    assert ev.results()["tt"]["n"] == 2


def test_impressions_of_requests_not_served_here_are_not_evaluated() -> None:
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5))
    feed(ev, [imp("other", "a", 0.0), click("other", "a", 1.0)])
    ev.flush()
    assert ev.stats()["impressions"] == {"evaluated": 0, "not_served": 1}
    assert ev.results() == {}


def test_each_impression_is_scored_by_the_model_that_served_it_plus_shadows() -> None:
    old = ModelHandle(Table({"a": 0.2, "b": 0.8}), "tt", 1)  # ranks wrong: AUC 0
    new = ModelHandle(Table({"a": 0.8, "b": 0.2}), "tt", 2)  # ranks right: AUC 1
    shadow = StaticLearnerSource(Table({"a": 0.5, "b": 0.5}), name="ctr")
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5), shadows={"ctr": shadow})
    ev.record_served("r1", old)
    ev.record_served("r2", new)
    feed(ev, [imp("r1", "a", 0.0), imp("r1", "b", 0.0), click("r1", "a", 1.0)])
    ev.flush()
    assert ev.results()["tt"]["auc"] == 0.0  # r1 judged with the old model, though a newer one exists
    assert ev.results()["ctr"]["auc"] == 0.5  # ties count half
    feed(ev, [imp("r2", "a", 10.0), imp("r2", "b", 10.0), click("r2", "a", 11.0)])
    ev.flush()
    assert ev.results()["tt"]["auc"] == 0.5  # rolling over both: (0 + 1) pairs of 2


def test_served_memory_is_bounded() -> None:
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5, served_capacity=2))
    m = ModelHandle(Table({"a": 0.5}), "tt", 1)
    for rid in ("r1", "r2", "r3"):
        ev.record_served(rid, m)
    feed(ev, [imp("r1", "a", 0.0), imp("r3", "a", 0.0)])
    ev.flush()
    assert ev.stats()["impressions"] == {"evaluated": 1, "not_served": 1}


def test_a_model_is_held_only_while_a_request_or_impression_needs_it() -> None:
    # a reloading scorer answers with a new handle every period: the evaluator must not keep
    # every one of them alive for served_capacity requests (each is a whole model)
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5, served_capacity=2))
    handles = [ModelHandle(Table({"a": 0.5}), "tt", v) for v in range(4)]
    for n, h in enumerate(handles):
        ev.record_served(f"r{n}", h)
    assert ev.models_held() == 2  # r0 and r1 were forgotten: so were their models
    feed(ev, [imp("r3", "a", 0.0)])
    ev.record_served("r4", handles[0])
    ev.record_served("r5", handles[0])  # r3 is forgotten as a request, its impression still waits
    assert ev.models_held() == 2  # handles[3] (the pending impression) and handles[0]
    ev.flush()
    assert ev.models_held() == 1
    assert ev.stats()["impressions"] == {"evaluated": 1, "not_served": 0}


def test_pending_impressions_leave_the_garbage_collector_nothing_to_scan() -> None:
    # every collection (a pause of every request) scans the tracked objects of its generations:
    # the impressions waiting for their click window must not stay among them
    import gc

    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=600))
    ev.record_served("r1", ModelHandle(Table({}), "tt", 1))
    events = [Event(kind="impression", event_id=f"i{n}", event_time=float(n), user_id="u1", request_id="r1",
                    item_id=f"item{n}", item_features={"tags": ("a", "b"), "price": 3.5},
                    user_features={"age": "25-34"}, label=0, position=0) for n in range(500)]
    feed(ev, events)
    del events
    for _ in range(3):  # each look untracks what holds only untracked values (children first)
        gc.collect()
    assert ev.stats()["pending"] == 500
    tracked = [p for p in ev._pending.values() if gc.is_tracked(p) or gc.is_tracked(p[2])]
    assert tracked == []


def test_metrics_are_exported() -> None:
    reg = CollectorRegistry()
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5), metrics=Metrics(registry=reg))
    ev.record_served("r1", ModelHandle(Table({"a": 0.9, "b": 0.1}), "tt", 1))
    feed(ev, [imp("r1", "a", 0.0), imp("r1", "b", 0.0), imp("rX", "a", 0.0), click("r1", "a", 1.0),
              click("r1", "b", 50.0)])
    ev.flush()
    get = reg.get_sample_value
    assert get("towerstream_online_auc", {"learner": "tt"}) == 1.0
    assert get("towerstream_online_logloss", {"learner": "tt"}) == pytest.approx(-math.log(0.9))
    assert get("towerstream_online_impressions_total", {"outcome": "evaluated"}) == 2
    assert get("towerstream_online_impressions_total", {"outcome": "not_served"}) == 1
    assert get("towerstream_online_clicks_total", {"join": "joined"}) == 1
    assert get("towerstream_online_clicks_total", {"join": "late"}) == 1
