"""The learner process's Prometheus metrics, read from its stream runtime at scrape time.

A learner process registers a :class:`LearnerStatsCollector` and serves it with
:func:`streams.exposition.start_metrics_server` (``towerstream learn --metrics-port``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streams.exposition import PREFIX, number as _num, read_source as _read

logger = logging.getLogger(__name__)

__all__ = ["LearnerStatsCollector", "learner_ready"]


class LearnerStatsCollector(Collector):
    """Exports a learner process's runtime stats, read at scrape time (pull style).

    Parameters
    ----------
    runtime
        A :class:`learners.runtime.StreamLearnerRuntime` (its ``stats()`` is called), a
        zero-argument function returning a :class:`~learners.runtime.RuntimeStats`, or a
        stats snapshot.
    topic
        The ``topic`` label (the runtime consumes one topic: ``Topics.events``).
    clock
        Wall clock for the model age.

    Exports ``towerstream_events_consumed_total{topic}`` (records), ``towerstream_dead_letters_total{topic,
    reason}``, ``towerstream_consumer_lag_records{topic, group}``, ``towerstream_events_learned_total{learner}``
    (this process), ``towerstream_model_events_learned{learner}`` (since the model was created),
    ``towerstream_prequential_auc{learner, window}`` and ``towerstream_prequential_logloss{learner,
    window}`` (``window``: ``all`` or ``rolling``), ``towerstream_checkpoints_total{learner}``,
    ``towerstream_model_age_seconds{learner}`` (since the last checkpoint).
    """

    def __init__(self, runtime: Any, *, topic: str = "towerstream.events",
                 clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.topic = topic
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        try:
            stats = _read(self.runtime, "stats")
        except Exception:  # a scrape must never take the learner down
            logger.exception("reading learner runtime stats failed")
            return
        yield from self._families(stats)

    def _families(self, s: Any) -> Iterator[Metric]:
        p = PREFIX
        consumed = CounterMetricFamily(f"{p}_events_consumed", "Records consumed, decoded and handled.",
                                       labels=["topic"])
        dead = CounterMetricFamily(f"{p}_dead_letters", "Records sent to the dead-letter topic.",
                                   labels=["topic", "reason"])
        lag = GaugeMetricFamily(f"{p}_consumer_lag_records", "Consumer lag summed over assigned partitions.",
                                labels=["topic", "group"])
        learned = CounterMetricFamily(f"{p}_events_learned", "Impressions learned by this process.",
                                      labels=["learner"])
        model_n = GaugeMetricFamily(f"{p}_model_events_learned", "Impressions folded into the model since it was created.",
                                    labels=["learner"])
        auc = GaugeMetricFamily(f"{p}_prequential_auc", "Prequential (predict-then-learn) ROC AUC.",
                                labels=["learner", "window"])
        ll = GaugeMetricFamily(f"{p}_prequential_logloss", "Prequential (predict-then-learn) log loss.",
                               labels=["learner", "window"])
        ckpts = CounterMetricFamily(f"{p}_checkpoints", "Checkpoints written by this process.", labels=["learner"])
        age = GaugeMetricFamily(f"{p}_model_age_seconds", "Seconds since the model's last checkpoint.",
                                labels=["learner"])
        if s is not None:
            learner = str(getattr(s, "learner", "unknown"))
            consumed.add_metric([self.topic], float(getattr(s, "records", 0)))
            by_reason = getattr(s, "dead_lettered_by_reason", None)
            if isinstance(by_reason, Mapping) and by_reason:
                for reason, n in by_reason.items():
                    dead.add_metric([self.topic, str(reason)], float(n))
            else:
                dead.add_metric([self.topic, "all"], float(getattr(s, "dead_lettered", 0)))
            per_topic: dict[str, float] = {}
            for tp, n in (getattr(s, "lag", None) or {}).items():
                topic = tp[0] if isinstance(tp, tuple) else self.topic
                per_topic[topic] = per_topic.get(topic, 0.0) + float(n)
            for topic, n in per_topic.items():
                lag.add_metric([topic, str(getattr(s, "group_id", ""))], n)
            learned.add_metric([learner], float(getattr(s, "events_learned_run", 0)))
            model_n.add_metric([learner], float(getattr(s, "events_learned", 0)))
            m = getattr(s, "metrics", None) or {}
            for fam, key in ((auc, "auc"), (ll, "logloss")):
                for window, name in (("all", key), ("rolling", f"rolling_{key}")):
                    v = _num(m.get(name))
                    if v is not None and not math.isnan(v):
                        fam.add_metric([learner, window], v)
            ckpts.add_metric([learner], float(getattr(s, "checkpoints", 0)))
            t = _num(getattr(s, "last_checkpoint_at", None))
            if t is not None:
                age.add_metric([learner], max(0.0, self.clock() - t))
        yield from (consumed, dead, lag, learned, model_n, auc, ll, ckpts, age)



def learner_ready(runtime: Any) -> Callable[[], tuple[bool, str]]:
    """A ``/readyz`` check for a learner process: ready once its runtime consumed a batch.

    >>> learner_ready(lambda: type("S", (), {"records": 0})())()
    (False, 'no record consumed yet')
    """
    def check() -> tuple[bool, str]:
        s = _read(runtime, "stats")
        n = int(getattr(s, "records", 0))
        return (n > 0, f"{n} records consumed" if n else "no record consumed yet")

    return check
