"""The indexer process's Prometheus metrics, read from the indexer service at scrape time.

The indexer process registers an :class:`IndexerStatsCollector` and serves it with
:func:`streams.exposition.start_metrics_server` (``towerstream index run --metrics-port``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streams.exposition import PREFIX, number as _num, read_source as _read, version_number

logger = logging.getLogger(__name__)

__all__ = ["IndexerStatsCollector", "indexer_ready", "BUILD_BUCKETS"]

BUILD_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


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
    ``towerstream_index_quality_auc`` (held-out AUC of the frozen towers),
    ``towerstream_index_retrieval{metric="recall|hr|ndcg",k,search="served|flat|popularity"}``
    ``towerstream_index_retrieval_users`` and ``towerstream_index_retrieval_version``
    (Recall/HR/NDCG@K of the latest published version that had held-out clicks to be
    measured on, :mod:`indexer.evaluation`, and that version; absent until measured).
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
        retrieval = GaugeMetricFamily(
            f"{p}_index_retrieval", "Recall/HR/NDCG@K of the published version on the held-out clicks, "
            "by search (served index, exact flat search, popularity).", labels=["metric", "k", "search"])
        retrieval_users = GaugeMetricFamily(f"{p}_index_retrieval_users",
                                            "Users with a held-out click that the retrieval gauges average.")
        retrieval_version = GaugeMetricFamily(f"{p}_index_retrieval_version",
                                              "Index version the retrieval gauges measured.")
        if s is not None:
            self._retrieval(getattr(s, "retrieval", None), retrieval, retrieval_users, retrieval_version)
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
        yield from (version, age, items, recall, quality, retrieval, retrieval_users, retrieval_version)

    @staticmethod
    def _retrieval(report: Any, family: GaugeMetricFamily, users: GaugeMetricFamily,
                   measured: GaugeMetricFamily) -> None:
        if not isinstance(report, dict) or not report.get("users"):
            return
        users.add_metric([], float(report["users"]))
        if report.get("version") is not None:
            measured.add_metric([], version_number(report["version"]))
        for search, values in report.get("metrics", {}).items():
            for key, value in values.items():
                metric, _, k = key.partition("@")
                v = _num(value)
                if v is not None and not math.isnan(v):
                    family.add_metric([metric, k, search], v)


def indexer_ready(service: Any) -> Callable[[], tuple[bool, str]]:
    """A ``/readyz`` check for the indexer process: ready once a version is published."""
    def check() -> tuple[bool, str]:
        m = getattr(service, "metrics", service)
        v = getattr(m, "index_version", None)
        return (v is not None, f"serving index version {v}" if v is not None else "no index version published yet")

    return check
