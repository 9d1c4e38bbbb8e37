"""Prometheus metrics of towerstream: every name, unit and label in one place.

Names follow the Prometheus conventions: the ``towerstream_`` prefix, base units in the
name (``_seconds``), ``_total`` on counters, and labels of low cardinality only (topic,
reason, stage, learner, source, outcome: never a user, item or request id).

Three producers export them, one per process kind, and Prometheus tells them apart by
``job``/``instance``:

* the scorer process creates a :class:`Metrics` (instrumented directly by the scorer,
  the request consumer, the online evaluator and the HTTP server);
* a learner process registers a :class:`learners.prometheus.LearnerStatsCollector` that
  reads the plain Python stats object of its stream runtime at scrape time;
* the indexer process registers an :class:`indexer.prometheus.IndexerStatsCollector` that
  reads the indexer service's counters at scrape time.

Each is defined in the layer that produces it; this module re-exports them so a reader
finds every name in one place. The shared server and helpers are in
:mod:`streams.exposition`.

Tests pass their own ``CollectorRegistry``; processes use the default one.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> reg = CollectorRegistry()
>>> m = Metrics(registry=reg)
>>> m.requests.labels(source="kafka", outcome="ok").inc()
>>> reg.get_sample_value("towerstream_requests_total", {"source": "kafka", "outcome": "ok"})
1.0
>>> "towerstream_score_latency_seconds" in metric_names(reg)
True
"""


from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info

from indexer.prometheus import BUILD_BUCKETS, IndexerStatsCollector, indexer_ready
from learners.prometheus import LearnerStatsCollector, learner_ready
from streams.exposition import (
    PREFIX,
    MetricsHTTPServer,
    metric_names,
    number as _num,
    start_metrics_server,
    version_number,
)

__all__ = [
    "PREFIX",
    "LATENCY_BUCKETS",
    "BUILD_BUCKETS",
    "STAGES",
    "Metrics",
    "LearnerStatsCollector",
    "IndexerStatsCollector",
    "MetricsHTTPServer",
    "start_metrics_server",
    "learner_ready",
    "indexer_ready",
    "metric_names",
    "version_number",
]

STAGES: tuple[str, ...] = ("encode", "retrieve", "prerank", "total", "fetch", "queue", "end_to_end")
"""``stage`` label values of the scoring latency histogram: the scorer's own stages (``total``
is their sum), then, for Kafka requests, from the request record's timestamp: ``fetch`` (to the
poll that returned it), ``queue`` (to the start of its scoring) and ``end_to_end`` (to its
ranking sent)."""

# Scoring budget is ~10 ms: fine buckets below it, coarse ones above.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class Metrics:
    """The scorer process's metrics, registered in ``registry``.

    Parameters
    ----------
    registry
        Where the metrics are registered; the process-wide default when omitted.
        Creating two ``Metrics`` in one registry raises ``ValueError`` (duplicate
        names), so a process creates one and passes it down.

    Attributes
    ----------
    events_consumed : Counter
        ``towerstream_events_consumed_total{topic}``: records decoded and handled.
    dead_letters : Counter
        ``towerstream_dead_letters_total{topic, reason}``: records sent to the dead-letter topic.
    consumer_lag : Gauge
        ``towerstream_consumer_lag_records{topic, group}``: end offset minus position, summed over partitions.
    score_latency : Histogram
        ``towerstream_score_latency_seconds{stage}``: per request, stage in :data:`STAGES`.
    requests : Counter
        ``towerstream_requests_total{source, outcome}``: source ``kafka|http``,
        outcome ``ok|invalid|unavailable|error``.
    rankings_produced : Counter
        ``towerstream_rankings_produced_total``: ranked lists written to the rankings topic.
    index_version, index_info, index_age, index_swaps
        The served index: ``towerstream_index_version``, ``towerstream_index_info{version}``,
        ``towerstream_index_age_seconds``, ``towerstream_index_swaps_total``.
    model_version, model_info, model_age
        The served model: ``towerstream_model_version{learner}``, ``towerstream_model_info``,
        ``towerstream_model_age_seconds{learner}``; ``towerstream_model_reloads_total{learner}``.
    online_auc, online_logloss : Gauge
        ``towerstream_online_auc{learner}``, ``towerstream_online_logloss{learner}``: what
        was served, joined with impressions and clicks.
    online_impressions, online_clicks : Counter
        ``towerstream_online_impressions_total{outcome}`` (``evaluated|not_served``),
        ``towerstream_online_clicks_total{join}`` (``joined|late|unmatched``).
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        p = PREFIX
        self.events_consumed = Counter(
            f"{p}_events_consumed_total", "Records consumed, decoded and handled.", ["topic"], registry=registry
        )
        self.dead_letters = Counter(
            f"{p}_dead_letters_total", "Records sent to the dead-letter topic.", ["topic", "reason"], registry=registry
        )
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag_records",
            "Consumer lag: end offset minus committed position, summed over assigned partitions.",
            ["topic", "group"],
            registry=registry,
        )
        self.score_latency = Histogram(
            f"{p}_score_latency_seconds",
            "Scoring latency per request by stage (encode, retrieve, prerank, total; queue and end_to_end from the request record's timestamp).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            f"{p}_requests_total", "Scoring requests by source and outcome.", ["source", "outcome"], registry=registry
        )
        self.rankings_produced = Counter(
            f"{p}_rankings_produced_total", "Ranked lists produced to the rankings topic.", registry=registry
        )
        self.index_version = Gauge(f"{p}_index_version", "Version of the index being served.", registry=registry)
        self.index_info = Info(f"{p}_index", "The index being served.", registry=registry)
        self.index_age = Gauge(
            f"{p}_index_age_seconds", "Seconds since the served index was built.", registry=registry
        )
        self.index_swaps = Counter(f"{p}_index_swaps_total", "Index hot swaps in this process.", registry=registry)
        self.model_version = Gauge(
            f"{p}_model_version", "Version of the model being served.", ["learner"], registry=registry
        )
        self.model_info = Info(f"{p}_model", "The model being served.", registry=registry)
        self.model_age = Gauge(
            f"{p}_model_age_seconds", "Seconds since the served model's checkpoint was written.", ["learner"],
            registry=registry,
        )
        self.model_reloads = Counter(
            f"{p}_model_reloads_total", "Model checkpoints loaded by the scorer.", ["learner"], registry=registry
        )
        self.online_auc = Gauge(
            f"{p}_online_auc", "Online ROC AUC of served scores against clicks (rolling window).", ["learner"],
            registry=registry,
        )
        self.online_logloss = Gauge(
            f"{p}_online_logloss", "Online log loss of served scores against clicks (rolling window).", ["learner"],
            registry=registry,
        )
        self.online_impressions = Counter(
            f"{p}_online_impressions_total", "Impressions seen by the online evaluator.", ["outcome"],
            registry=registry,
        )
        self.online_clicks = Counter(
            f"{p}_online_clicks_total", "Clicks seen by the online evaluator, by join outcome.", ["join"],
            registry=registry,
        )
        # Pre-create the label values that dashboards rate() over, so series exist at 0.
        for stage in STAGES:
            self.score_latency.labels(stage=stage)
        for outcome in ("ok", "invalid", "unavailable", "error"):
            for source in ("kafka", "http"):
                self.requests.labels(source=source, outcome=outcome)
        for outcome in ("evaluated", "not_served"):
            self.online_impressions.labels(outcome=outcome)
        for join in ("joined", "late", "unmatched"):
            self.online_clicks.labels(join=join)

    def track(self, learner_source: Any, index_holder: Any, *, clock: Callable[[], float] = time.time) -> None:
        """Read the served index's version/age and the served model's age at scrape time.

        ``learner_source.current()`` gives a ``ModelHandle`` (or None); ``index_holder.current``
        an index handle (or None) whose manifest has ``published_at``.
        """
        self._source = learner_source
        self._clock = clock

        def index_version() -> float:
            h = index_holder.current
            return float("nan") if h is None else version_number(h.version)

        def index_age() -> float:
            h = index_holder.current
            t = None if h is None else _num((getattr(h, "manifest", None) or {}).get("published_at"))
            return float("nan") if t is None else max(0.0, clock() - t)

        self.index_version.set_function(index_version)
        self.index_age.set_function(index_age)
        handle = learner_source.current()
        if handle is not None:
            self.on_model_loaded(handle)

    def on_model_loaded(self, handle: Any) -> None:
        """Hook for ``CheckpointLearnerSource(on_load=...)``: count the reload, export version and age."""
        name = str(handle.name)
        self.model_reloads.labels(learner=name).inc()
        self.model_version.labels(learner=name).set(version_number(handle.version))
        self.model_info.info({"learner": name, "version": str(handle.version)})
        source, clock = getattr(self, "_source", None), getattr(self, "_clock", time.time)

        def age() -> float:
            current = source.current() if source is not None else handle
            t = _num(getattr(current, "created_at", None))
            return float("nan") if t is None else max(0.0, clock() - t)

        self.model_age.labels(learner=name).set_function(age)

    def on_index_swap(self, handle: Any) -> None:
        """Hook for ``IndexWatcher(on_swap=...)``: count the swap, export the version label."""
        self.index_swaps.inc()
        self.index_info.info({"version": str(handle.version)})
        if getattr(self, "_source", None) is None:  # not tracking: set the plain values
            self.index_version.set(version_number(handle.version))


# --------------------------------------------------------------------------- collectors

