"""Prometheus metrics of towerstream: every name, unit and label in one place.

Names follow the Prometheus conventions: the ``towerstream_`` prefix, base units in the
name (``_seconds``), ``_total`` on counters, and labels of low cardinality only (topic,
reason, stage, learner, source, outcome: never a user, item or request id).

Three producers export them, one per process kind, and Prometheus tells them apart by
``job``/``instance``:

* the scorer process creates a :class:`Metrics` (instrumented directly by the scorer,
  the request consumer, the online evaluator and the HTTP server);
* a learner process registers a :class:`LearnerStatsCollector` that reads the plain
  Python stats object of its stream runtime at scrape time;
* the indexer process registers an :class:`IndexerStatsCollector` that reads the
  indexer service's counters at scrape time.

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

import functools
import inspect
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "PREFIX",
    "LATENCY_BUCKETS",
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

logger = logging.getLogger(__name__)

PREFIX = "towerstream"
STAGES: tuple[str, ...] = ("encode", "retrieve", "prerank", "total")
"""``stage`` label values of the scoring latency histogram."""

# Scoring budget is ~10 ms: fine buckets below it, coarse ones above.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
BUILD_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def version_number(version: Any) -> float:
    """A version as a number for a gauge: ints as is, else the last run of digits.

    >>> version_number(12), version_number("v000042"), version_number("20240101T1200-7")
    (12.0, 42.0, 7.0)
    >>> version_number(None)
    nan
    """
    if isinstance(version, bool) or version is None:
        return float("nan")
    if isinstance(version, (int, float)):
        return float(version)
    digits = re.findall(r"\d+", str(version))
    return float(digits[-1]) if digits else float("nan")


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
            "Scoring latency per request by stage (encode, retrieve, prerank, total).",
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


def _num(value: Any) -> float | None:
    """A finite-or-NaN float, or None for missing/non-numeric values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _read(source: Any, method: str) -> Any:
    """``source.<method>()`` if it has that method, else ``source()`` if it is a plain
    function, else ``source`` itself (already a snapshot)."""
    fn = getattr(source, method, None)
    if callable(fn):
        return fn()
    if inspect.isroutine(source) or isinstance(source, functools.partial):
        return source()
    return source


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


class IndexerStatsCollector(Collector):
    """Exports the indexer service's plain counters, read at scrape time (pull style).

    Parameters
    ----------
    service
        An :class:`indexer.service.IndexerService` (its ``metrics`` attribute is read),
        an :class:`~indexer.service.IndexerMetrics`, or a function returning one.
    recall_k
        The ``k`` label of the recall gauge; None reads ``service.build_config.recall_k``.
    clock
        Wall clock for the index age.

    Exports ``towerstream_index_builds_total``, ``towerstream_index_refused_builds_total``,
    ``towerstream_index_failed_builds_total``, ``towerstream_index_retrains_total``,
    ``towerstream_index_build_seconds`` (histogram: each new build observes the last build's
    duration when the counter moved between two scrapes), ``towerstream_index_version``,
    ``towerstream_index_age_seconds`` (since the served version was published),
    ``towerstream_index_items``, ``towerstream_index_recall_at_k{k}``,
    ``towerstream_index_quality_auc`` (held-out AUC of the frozen towers).
    """

    def __init__(self, service: Any, *, recall_k: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.clock = clock
        if recall_k is None:
            recall_k = getattr(getattr(service, "build_config", None), "recall_k", None)
        self.recall_k = "" if recall_k is None else str(recall_k)
        self._lock = threading.Lock()
        self._seen_builds = 0
        # Not registered anywhere: collect() re-exports its samples.
        self._build_seconds = Histogram(
            f"{PREFIX}_index_build_seconds", "Duration of index builds (embed + train + add + tune).",
            buckets=BUILD_BUCKETS, registry=None,
        )

    def _stats(self) -> Any:
        metrics = getattr(self.service, "metrics", None)
        if metrics is not None and not callable(metrics):
            return metrics
        return _read(self.service, "snapshot")

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception:  # a scrape must never take the indexer down
            logger.exception("reading indexer stats failed")
            return
        yield from self._families(stats)

    def _families(self, s: Any) -> Iterator[Metric]:
        p = PREFIX
        builds = CounterMetricFamily(f"{p}_index_builds", "Index versions built and published.")
        refused = CounterMetricFamily(f"{p}_index_refused_builds", "Index builds refused by the guardrail.")
        failed = CounterMetricFamily(f"{p}_index_failed_builds", "Index builds that failed with an error.")
        retrains = CounterMetricFamily(f"{p}_index_retrains", "IVF centroid retrainings.")
        version = GaugeMetricFamily(f"{p}_index_version", "Version of the latest published index.")
        age = GaugeMetricFamily(f"{p}_index_age_seconds", "Seconds since the served index version was published.")
        items = GaugeMetricFamily(f"{p}_index_items", "Items in the latest published index.")
        recall = GaugeMetricFamily(f"{p}_index_recall_at_k", "Recall@K of the ANN index against exact search.",
                                   labels=["k"])
        quality = GaugeMetricFamily(f"{p}_index_quality_auc", "Held-out AUC of the frozen towers' dot product.")
        if s is not None:
            n_builds = int(getattr(s, "builds_total", 0))
            builds.add_metric([], float(n_builds))
            refused.add_metric([], float(getattr(s, "refused_total", 0)))
            failed.add_metric([], float(getattr(s, "failed_total", 0)))
            retrains.add_metric([], float(getattr(s, "retrains_total", 0)))
            last = _num(getattr(s, "last_build_seconds", None))
            with self._lock:
                new = n_builds - self._seen_builds
                if new > 0 and last is not None and not math.isnan(last):
                    for _ in range(min(new, 1000)):
                        self._build_seconds.observe(last)
                self._seen_builds = max(self._seen_builds, n_builds)
            v = getattr(s, "index_version", None)
            if v is not None:
                version.add_metric([], version_number(v))
            age_fn = getattr(s, "index_age_seconds", None)
            a = _num(age_fn(self.clock()) if callable(age_fn) else age_fn)
            if a is not None and not math.isnan(a):
                age.add_metric([], max(0.0, a))
            items.add_metric([], float(getattr(s, "index_items", 0)))
            r = _num(getattr(s, "last_recall", None))
            if r is not None and not math.isnan(r):
                recall.add_metric([self.recall_k], r)
            q = _num(getattr(s, "last_auc", None))
            if q is not None and not math.isnan(q):
                quality.add_metric([], q)
        yield from (builds, refused, failed, retrains)
        yield from self._build_seconds.collect()
        yield from (version, age, items, recall, quality)


# --------------------------------------------------------------------------- helpers


class _MetricsHandler(BaseHTTPRequestHandler):
    server: "MetricsHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"alive\n")
        elif path == "/readyz":
            try:
                ready, reason = self.server.ready()
            except Exception as exc:  # a probe must answer, whatever the check did
                ready, reason = False, f"readiness check failed: {type(exc).__name__}: {exc}"
            self._send(200 if ready else 503, f"{reason}\n".encode())
        else:
            self._send(404, b"try /metrics, /healthz or /readyz\n")


class MetricsHTTPServer(ThreadingHTTPServer):
    """``/metrics``, ``/healthz`` and ``/readyz`` for processes without the scorer's HTTP
    server (learners, the indexer)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 ready: Callable[[], tuple[bool, str]]) -> None:
        super().__init__(address, _MetricsHandler)
        self.registry = registry
        self.ready = ready

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def start_metrics_server(
    port: int,
    registry: CollectorRegistry = REGISTRY,
    addr: str = "0.0.0.0",
    *,
    ready: Callable[[], tuple[bool, str]] | None = None,
) -> MetricsHTTPServer:
    """Serve ``/metrics`` of ``registry`` (plus ``/healthz`` and ``/readyz``) from a daemon thread.

    Parameters
    ----------
    port
        TCP port; ``0`` picks a free one (``server.port``).
    registry
        What ``/metrics`` exposes.
    addr
        Bind address.
    ready
        ``() -> (ready, reason)`` for ``/readyz`` (200 or 503 with the reason), e.g. "a
        checkpoint was loaded" for a learner or "a version is published" for the indexer;
        None: always ready.

    Stop it with ``server.shutdown()``.
    """
    server = MetricsHTTPServer((addr, port), registry, ready or (lambda: (True, "ok")))
    threading.Thread(target=server.serve_forever, args=(0.1,), name="metrics-http", daemon=True).start()
    logger.info("serving /metrics /healthz /readyz on %s:%d", addr, server.port)
    return server


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


def indexer_ready(service: Any) -> Callable[[], tuple[bool, str]]:
    """A ``/readyz`` check for the indexer process: ready once a version is published."""
    def check() -> tuple[bool, str]:
        m = getattr(service, "metrics", service)
        v = getattr(m, "index_version", None)
        return (v is not None, f"serving index version {v}" if v is not None else "no index version published yet")

    return check


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` exposes (``_total``, ``_bucket``, ``_info`` ... included)."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update(f"{family.name}{s}" for s in ("_sum", "_count"))
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "info":
            names.add(f"{family.name}_info")
    return names
