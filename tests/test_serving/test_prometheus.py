"""A REAL Prometheus scrapes the scorer, a learner exporter and the indexer exporter.

The scorer is the real ``ServingApp`` (HTTP only, no Kafka here; the Kafka path is in
test_e2e_kafka) over a trained two-tower checkpoint and an index built by the real
indexer service; requests arrive over HTTP while Prometheus scrapes every second.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from learners.metrics import PrequentialMetrics
from learners.runtime import RuntimeStats, metrics_summary
from serving.app import ServeConfig, ServingApp
from serving.metrics import STAGES, IndexerStatsCollector, LearnerStatsCollector, indexer_ready, start_metrics_server

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "towerstream.json"


class GrowingRuntime:
    """Stands in for a learner runtime (which needs Kafka): real prequential metrics, growing counts."""

    def __init__(self) -> None:
        self.metrics = PrequentialMetrics()
        self.n = 0
        self.lock = threading.Lock()

    def step(self) -> None:
        with self.lock:
            self.n += 100
            ys = [1 if (self.n + i) % 7 == 0 else 0 for i in range(100)]
            self.metrics.update(ys, [0.8 if y else 0.3 for y in ys[:50]] + [0.4] * 50)

    def stats(self) -> RuntimeStats:
        with self.lock:
            return RuntimeStats(
                group_id="learner-ctr", learner="ctr", events_learned=self.n, events_learned_run=self.n,
                events_per_s=0.0, events_per_s_run=0.0, records=self.n, skipped=0, dead_lettered=0,
                duplicates=0, lag={}, total_lag=None, checkpoints=1, last_checkpoint_at=time.time() - 3,
                elapsed_s=1.0, metrics=metrics_summary(self.metrics),
            )


def test_prometheus_scrapes_scorer_learner_and_indexer(trained_artifacts: Any, prometheus: Any, fakes: Any) -> None:
    art = trained_artifacts
    reg = CollectorRegistry()
    app = ServingApp(ServeConfig(checkpoint=art.checkpoint, index_root=art.index_root, kafka=None,
                                 host="127.0.0.1", port=0, catalogue=art.catalogue, index_poll_s=0.2),
                     registry=reg).start()
    learner_reg, indexer_reg = CollectorRegistry(), CollectorRegistry()
    runtime = GrowingRuntime()
    learner_reg.register(LearnerStatsCollector(runtime))
    indexer_reg.register(IndexerStatsCollector(art.service))
    servers = [start_metrics_server(0, learner_reg, addr="127.0.0.1"),
               start_metrics_server(0, indexer_reg, addr="127.0.0.1", ready=indexer_ready(art.service))]
    stop = threading.Event()
    base = f"http://127.0.0.1:{app.port}"

    def traffic() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            fakes.http_get(f"{base}/recommend?user_id=u{n % 200}&k=5")
            if n % 20 == 0:
                runtime.step()
            time.sleep(0.005)

    thread = threading.Thread(target=traffic, daemon=True)
    try:
        deadline = time.monotonic() + 30
        while fakes.http_get(f"{base}/readyz")[0] != 200:
            assert time.monotonic() < deadline, fakes.http_get(f"{base}/readyz")
            time.sleep(0.1)
        thread.start()
        prom = prometheus({"scorer": [f"127.0.0.1:{app.port}"],
                           "learners": [f"127.0.0.1:{servers[0].port}"],
                           "indexer": [f"127.0.0.1:{servers[1].port}"]})
        prom.wait_for("up", lambda r: len(r) == 3 and all(x["value"][1] == "1" for x in r))

        ok = 'towerstream_requests_total{job="scorer",source="http",outcome="ok"}'
        first = prom.wait_for(ok, lambda r: len(r) == 1 and float(r[0]["value"][1]) > 0)
        v1 = float(first[0]["value"][1])
        second = prom.wait_for(ok, lambda r: float(r[0]["value"][1]) > v1)  # increased between scrapes
        assert float(second[0]["value"][1]) > v1

        p99 = "histogram_quantile(0.99, sum by (le) (rate(towerstream_score_latency_seconds_bucket[5s])))"
        result = prom.wait_for(p99, lambda r: len(r) == 1 and r[0]["value"][1] not in ("NaN", "+Inf"))
        assert 0 < float(result[0]["value"][1]) < 10  # seconds: positive and plausible
        stages = prom.query('sum by (stage) (towerstream_score_latency_seconds_count{job="scorer"})')
        # HTTP requests have no Kafka record timestamp: only the scorer's own stages are observed
        assert {r["metric"]["stage"] for r in stages} == set(STAGES)  # every stage pre-created, exported
        counted = prom.query('sum by (stage) (towerstream_score_latency_seconds_count{job="scorer"}) > 0')
        assert {r["metric"]["stage"] for r in counted} == {"encode", "retrieve", "prerank", "total"}

        # Freshness and versions: the scorer serves version 1, the indexer published it.
        assert prom.values('towerstream_index_version{job="scorer"}') == [1.0]
        assert prom.values('towerstream_index_version{job="indexer"}') == [1.0]
        assert prom.values('towerstream_index_builds_total{job="indexer"}') == [1.0]
        assert 0 <= prom.values('towerstream_index_age_seconds{job="scorer"}')[0] < 3600
        assert prom.values('towerstream_model_version{job="scorer",learner="two-tower"}') == [art.events_learned]
        assert 0 <= prom.values('towerstream_model_age_seconds{job="scorer",learner="two-tower"}')[0] < 3600
        recall = prom.values('towerstream_index_recall_at_k{job="indexer",k="100"}')
        assert recall and 0.9 <= recall[0] <= 1.0

        # The learner exporter: a counter that grows and a prequential AUC in [0, 1].
        learned = 'towerstream_events_learned_total{job="learners",learner="ctr"}'
        l1 = prom.wait_for(learned, lambda r: len(r) == 1 and float(r[0]["value"][1]) > 0)
        prom.wait_for(learned, lambda r: float(r[0]["value"][1]) > float(l1[0]["value"][1]))
        auc = prom.wait_for('towerstream_prequential_auc{learner="ctr",window="all"}', lambda r: len(r) == 1)
        assert 0.0 <= float(auc[0]["value"][1]) <= 1.0

        # Every dashboard query is valid PromQL for this Prometheus (most return data here).
        dash = json.loads(DASHBOARD.read_text())
        with_data = 0
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                rows = prom.query(target["expr"].replace("[1m]", "[10s]"))
                with_data += bool(rows)
        assert with_data >= 10
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=10)
        for s in servers:
            s.shutdown()
            s.server_close()
        app.stop()
    assert not math.isnan(runtime.metrics.snapshot()["auc"])
