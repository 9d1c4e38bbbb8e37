"""Online evaluation of what is served: impressions joined to clicks, per learner.

The scorer remembers every request it answered (:meth:`OnlineEvaluator.record_served`:
request id -> the model handle that answered it). The events stream then brings, for
each request, one impression per shown item and one click per clicked item. The join
runs on event time:

* an impression opens a pending example keyed ``(request_id, item_id)``;
* a click whose impression is pending and at most ``window_seconds`` younger joins it
  (label 1); a click that comes later, or after its impression was finalised, is
  *late*: counted, never changing a finalised label; a click with no impression at all
  is *unmatched* once the window has passed;
* when the watermark (event time up to which the stream is complete; the events loop
  uses the slowest active partition's newest event time) passes ``impression time +
  window``, the impression is finalised with label 1 if a click joined it, else 0.

A finalised impression of a served request is scored by the learner that served it
(the same immutable handle, so a reload in between does not change history) with
``predict_proba_many`` on the impression's user and item features (no position, as at
serving time), plus each *shadow* learner's current model for comparison. AUC and log
loss are kept over the last ``rolling_size`` examples of each learner. Impressions of
requests this process did not serve are counted as ``not_served`` and not evaluated.

>>> import numpy as np
>>> from streams.events import Event
>>> from serving.scorer import ModelHandle
>>> class Half:
...     def predict_proba_many(self, xs): return np.array([0.9 if x["item_id"] == "a" else 0.2 for x in xs])
>>> ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=10))
>>> ev.record_served("r1", ModelHandle(Half(), name="tt", version=1))
>>> mk = lambda kind, item, t, **kw: Event(kind=kind, event_id=f"{kind}{item}{t}", event_time=t,
...                                        user_id="u", request_id="r1", item_id=item, **kw)
>>> for e in [mk("impression", "a", 0.0, label=1, position=0), mk("impression", "b", 0.0, label=0, position=1),
...           mk("click", "a", 1.0), mk("click", "b", 50.0)]:
...     ev.observe(e); _ = ev.advance(e.event_time)
>>> ev.stats()["clicks"], round(ev.results()["tt"]["auc"], 3)
({'joined': 1, 'late': 1, 'unmatched': 0, 'duplicate': 0}, 1.0)
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from learners.base import event_to_x
from learners.metrics import log_loss, roc_auc
from serving.metrics import Metrics
from serving.scorer import LearnerSource, ModelHandle
from streams.events import Event

__all__ = ["OnlineEvalConfig", "OnlineEvaluator"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class OnlineEvalConfig:
    """Join and memory settings.

    Parameters
    ----------
    window_seconds
        Event-time window after an impression in which its click counts.
    served_capacity
        Served requests remembered (oldest forgotten first).
    closed_capacity
        Finalised ``(request_id, item_id)`` keys remembered, to tell a late click from
        an unmatched one.
    rolling_size
        AUC/log loss are computed over the last this many examples per learner.
    """

    window_seconds: float = 60.0
    served_capacity: int = 200_000
    closed_capacity: int = 500_000
    rolling_size: int = 20_000

    def __post_init__(self) -> None:
        if not self.window_seconds >= 0 or min(self.served_capacity, self.closed_capacity, self.rolling_size) < 1:
            raise ValueError("window_seconds must be >= 0 and the capacities >= 1")


# A pending impression is a plain tuple (event time, model slot, example, clicked): with
# only strings, numbers and tuples of those inside (the example as its key-value pairs), the collector stops tracking
# it after a look or two, so the tens of thousands waiting for their click window never make
# a young or full collection (a pause of every request) longer. The slot (-1: not
# served here) names a counted model handle, so a handle lives exactly as long as some
# served request or pending impression refers to it (not for served_capacity requests).
_Pending = tuple  # (event_time: float, slot: int, x: ((key, value), ...) | None, clicked: bool)
_TIME, _SLOT, _X, _CLICKED = 0, 1, 2, 3


class OnlineEvaluator:
    """Joins served requests, impressions and clicks; exports online AUC/log loss.

    Parameters
    ----------
    config
        Window and capacities.
    metrics
        Updated on every finalisation (``towerstream_online_*``); optional.
    shadows
        Extra learners evaluated on the same served impressions: name -> source of
        their current model (e.g. the CTR baseline and the logistic regression).

    Thread-safe: the request loop calls :meth:`record_served`, the events loop
    :meth:`observe` and :meth:`advance`.
    """

    def __init__(
        self,
        config: OnlineEvalConfig = OnlineEvalConfig(),
        *,
        metrics: Metrics | None = None,
        shadows: Mapping[str, LearnerSource] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.shadows = dict(shadows or {})
        self._lock = threading.Lock()
        # a model's slot is id(handle): _handles keeps the handle alive while it has references,
        # so no other object can take that id meanwhile
        self._served: OrderedDict[str, int] = OrderedDict()  # request id -> model slot
        self._handles: dict[int, ModelHandle] = {}  # slot -> handle, while referenced
        self._refs: dict[int, int] = {}  # slot -> served requests + pending impressions
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._heap: list[tuple[float, int, tuple[str, str]]] = []
        self._orphans: dict[tuple[str, str], float] = {}
        self._orphan_heap: list[tuple[float, int, tuple[str, str]]] = []
        self._closed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._seq = itertools.count()
        self.watermark = -math.inf
        self._rolling: dict[str, deque[tuple[int, float]]] = {}
        self._impressions = {"evaluated": 0, "not_served": 0}
        self._clicks = {"joined": 0, "late": 0, "unmatched": 0, "duplicate": 0}

    # ------------------------------------------------------------------ model slots (under the lock)
    def _ref(self, model: ModelHandle) -> int:
        slot = id(model)
        self._handles[slot] = model
        self._refs[slot] = self._refs.get(slot, 0) + 1
        return slot

    def _unref(self, slot: int) -> None:
        if slot < 0:
            return
        left = self._refs[slot] - 1
        if left:
            self._refs[slot] = left
        else:
            del self._refs[slot], self._handles[slot]

    def models_held(self) -> int:
        """Model handles still referenced by a served request or a pending impression."""
        with self._lock:
            return len(self._handles)

    # ------------------------------------------------------------------ inputs
    def record_served(self, request_id: str, model: ModelHandle) -> None:
        """Remember that ``model`` answered ``request_id``."""
        with self._lock:
            slot = self._ref(model)
            old = self._served.pop(request_id, None)
            if old is not None:
                self._unref(old)
            self._served[request_id] = slot
            while len(self._served) > self.config.served_capacity:
                self._unref(self._served.popitem(last=False)[1])

    def observe(self, event: Event) -> None:
        """Take one impression or click (requests are ignored). Nothing is finalised
        here: the caller moves the watermark with :meth:`advance` (the events loop takes
        the slowest partition's event time, so one partition running ahead of another
        does not close windows whose clicks are still on their way)."""
        if event.kind == "impression":
            self._on_impression(event)
        elif event.kind == "click":
            self._on_click(event)

    def _count_click(self, join: str) -> None:
        self._clicks[join] += 1
        if self.metrics is not None:
            self.metrics.online_clicks.labels(join=join).inc()

    def _on_impression(self, e: Event) -> None:
        key = (e.request_id, e.item_id or "")
        with self._lock:
            if key in self._pending or key in self._closed:
                return  # a redelivered impression: counted once
            slot = self._served.get(e.request_id, -1)
            x = None  # not served here: never scored
            if slot >= 0:
                self._refs[slot] += 1
                # what the served model is scored on, as at serving time; as pairs (a dict holding a
                # tuple would stay tracked until a full collection)
                x = tuple(list(event_to_x(e, with_position=False).items()))
            clicked = False
            t_click = self._orphans.pop(key, None)
            if t_click is not None:
                if abs(t_click - e.event_time) <= self.config.window_seconds:
                    clicked = True
                    self._count_click("joined")
                else:
                    self._count_click("late")
            self._pending[key] = (e.event_time, slot, x, clicked)
            heapq.heappush(self._heap, (e.event_time, next(self._seq), key))

    def _on_click(self, e: Event) -> None:
        key = (e.request_id, e.item_id or "")
        with self._lock:
            p = self._pending.get(key)
            if p is not None:
                if p[_CLICKED]:
                    self._count_click("duplicate")
                elif e.event_time - p[_TIME] <= self.config.window_seconds:
                    self._pending[key] = (p[_TIME], p[_SLOT], p[_X], True)
                    self._count_click("joined")
                else:
                    self._count_click("late")
            elif key in self._closed:
                self._count_click("late")
            elif key not in self._orphans:
                self._orphans[key] = e.event_time
                heapq.heappush(self._orphan_heap, (e.event_time, next(self._seq), key))
            else:
                self._count_click("duplicate")

    # ------------------------------------------------------------------ finalisation
    def advance(self, watermark: float | None = None) -> int:
        """Move the watermark (newest event time) and finalise what the window closed."""
        with self._lock:
            if watermark is not None and watermark > self.watermark:
                self.watermark = watermark
            cutoff = self.watermark - self.config.window_seconds
            done = self._pop_until(cutoff)
        self._evaluate(done)
        return len(done)

    def flush(self) -> int:
        """Finalise every pending impression now (shutdown, tests)."""
        with self._lock:
            done = self._pop_until(math.inf)
        self._evaluate(done)
        return len(done)

    def _pop_until(self, cutoff: float) -> list[tuple[_Pending, ModelHandle | None]]:
        done: list[tuple[_Pending, ModelHandle | None]] = []
        while self._heap and self._heap[0][0] < cutoff:
            _, _, key = heapq.heappop(self._heap)
            p = self._pending.pop(key, None)
            if p is None:
                continue
            slot = p[_SLOT]
            done.append((p, self._handles.get(slot) if slot >= 0 else None))
            self._unref(slot)
            self._closed[key] = None
        while len(self._closed) > self.config.closed_capacity:
            self._closed.popitem(last=False)
        while self._orphan_heap and self._orphan_heap[0][0] < cutoff:
            _, _, key = heapq.heappop(self._orphan_heap)
            if self._orphans.pop(key, None) is not None:
                self._count_click("unmatched")
        return done

    def _evaluate(self, done: list[tuple[_Pending, ModelHandle | None]]) -> None:
        if not done:
            return
        served = [(p, m) for p, m in done if m is not None]
        not_served = len(done) - len(served)
        by_model: dict[int, tuple[ModelHandle, list[_Pending]]] = {}
        for p, m in served:
            by_model.setdefault(id(m), (m, []))[1].append(p)
        scored: dict[str, tuple[list[int], list[float]]] = {}
        for model, group in by_model.values():
            self._score_into(scored, model, group)
        if served:
            every = [p for p, _ in served]
            for name, source in self.shadows.items():
                handle = source.current()
                if handle is not None:
                    self._score_into(scored, ModelHandle(handle.learner, name, handle.version), every)
        with self._lock:
            self._impressions["evaluated"] += len(served)
            self._impressions["not_served"] += not_served
            for name, (ys, ps) in scored.items():
                buf = self._rolling.setdefault(name, deque(maxlen=self.config.rolling_size))
                buf.extend(zip(ys, ps))
            results = {name: self._result(name) for name in scored}
        if self.metrics is not None:
            m = self.metrics
            m.online_impressions.labels(outcome="evaluated").inc(len(served))
            m.online_impressions.labels(outcome="not_served").inc(not_served)
            for name, r in results.items():
                if not math.isnan(r["auc"]):
                    m.online_auc.labels(learner=name).set(r["auc"])
                m.online_logloss.labels(learner=name).set(r["logloss"])

    def _score_into(self, scored: dict[str, tuple[list[int], list[float]]], model: ModelHandle,
                    group: list[_Pending]) -> None:
        xs = [dict(p[_X]) for p in group]
        try:
            probs = np.asarray(model.learner.predict_proba_many(xs), dtype=np.float64)
        except Exception:  # evaluation must never stop the events loop
            logger.exception("online evaluation: %s version %s failed to score %d impressions",
                             model.name, model.version, len(xs))
            return
        ys, ps = scored.setdefault(model.name, ([], []))
        ys.extend(int(p[_CLICKED]) for p in group)
        ps.extend(probs.tolist())

    # ------------------------------------------------------------------ outputs
    def _result(self, name: str) -> dict[str, float]:
        buf = self._rolling.get(name)
        if not buf:
            return {"auc": float("nan"), "logloss": float("nan"), "n": 0}
        arr = np.asarray(buf, dtype=np.float64)
        y, p = arr[:, 0], arr[:, 1]
        return {"auc": roc_auc(y, p), "logloss": log_loss(y, p), "n": len(buf),
                "ctr": float(y.mean())}

    def results(self) -> dict[str, dict[str, float]]:
        """Per learner: rolling ``auc``, ``logloss``, ``n`` examples and observed ``ctr``."""
        with self._lock:
            return {name: self._result(name) for name in self._rolling}

    def stats(self) -> dict[str, Any]:
        """Counters: impressions by outcome, clicks by join, what is pending."""
        with self._lock:
            return {
                "impressions": dict(self._impressions),
                "clicks": dict(self._clicks),
                "pending": len(self._pending),
                "served_remembered": len(self._served),
                "models_held": len(self._handles),
                "watermark": self.watermark,
            }
