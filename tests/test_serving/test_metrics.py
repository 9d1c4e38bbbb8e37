"""Metric names and units, and the pull-style exporters of the learner and indexer stats."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from indexer.handle import IndexHolder
from indexer.service import IndexerMetrics
from learners.runtime import RuntimeStats
from serving.metrics import (
    IndexerStatsCollector,
    LearnerStatsCollector,
    Metrics,
    indexer_ready,
    learner_ready,
    metric_names,
    start_metrics_server,
    version_number,
)
from serving.scorer import ModelHandle
from streams.transport import TopicPartition

# Labels that stay low-cardinality: never a user, item or request id.
ALLOWED_LABELS = {"topic", "reason", "group", "stage", "source", "outcome", "learner", "window", "join", "k",
                  "le", "version", "quantile"}


def runtime_stats(**kw: Any) -> RuntimeStats:
    base = dict(
        group_id="learner-tt", learner="two-tower", events_learned=1500, events_learned_run=1000,
        events_per_s=50.0, events_per_s_run=40.0, records=1210, skipped=200, dead_lettered=10, duplicates=0,
        lag={TopicPartition("towerstream.events", 0): 7, TopicPartition("towerstream.events", 1): 5},
        total_lag=12, checkpoints=3, last_checkpoint_at=1000.0, elapsed_s=25.0,
        metrics={"n": 1000, "auc": 0.71, "logloss": 0.33, "rolling_auc": 0.74, "rolling_logloss": None},
    )
    base.update(kw)
    return RuntimeStats(**base)


def all_registries() -> list[CollectorRegistry]:
    regs = [CollectorRegistry(), CollectorRegistry(), CollectorRegistry()]
    Metrics(registry=regs[0])
    regs[1].register(LearnerStatsCollector(lambda: runtime_stats(), clock=lambda: 1010.0))
    m = IndexerMetrics(builds_total=2, last_build_seconds=1.5, last_recall=0.97, last_auc=0.7, index_version=2,
                       index_items=100, last_publish_time=time.time())
    regs[2].register(IndexerStatsCollector(m, recall_k=100))
    return regs


def test_names_follow_prometheus_conventions() -> None:
    for reg in all_registries():
        for fam in reg.collect():
            assert fam.name.startswith("towerstream_"), fam.name
            assert re.fullmatch(r"[a-z_]+", fam.name), fam.name
            if fam.type == "histogram":
                assert fam.name.endswith("_seconds"), fam.name
            if fam.type == "counter":
                assert not fam.name.endswith("_total")  # the client appends it to samples
                assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
            if fam.type == "gauge":
                assert not fam.name.endswith("_total"), fam.name
            for s in fam.samples:
                assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)


def test_learner_collector_reads_the_runtime_at_scrape_time() -> None:
    current = {"stats": runtime_stats()}

    class Runtime:
        def stats(self) -> RuntimeStats:
            return current["stats"]

    reg = CollectorRegistry()
    reg.register(LearnerStatsCollector(Runtime(), clock=lambda: 1010.0))
    get = reg.get_sample_value
    assert get("towerstream_events_consumed_total", {"topic": "towerstream.events"}) == 1210
    assert get("towerstream_dead_letters_total", {"topic": "towerstream.events", "reason": "all"}) == 10
    assert get("towerstream_consumer_lag_records", {"topic": "towerstream.events", "group": "learner-tt"}) == 12
    assert get("towerstream_events_learned_total", {"learner": "two-tower"}) == 1000
    assert get("towerstream_model_events_learned", {"learner": "two-tower"}) == 1500
    assert get("towerstream_prequential_auc", {"learner": "two-tower", "window": "all"}) == 0.71
    assert get("towerstream_prequential_auc", {"learner": "two-tower", "window": "rolling"}) == 0.74
    assert get("towerstream_prequential_logloss", {"learner": "two-tower", "window": "rolling"}) is None
    assert get("towerstream_checkpoints_total", {"learner": "two-tower"}) == 3
    assert get("towerstream_model_age_seconds", {"learner": "two-tower"}) == 10.0
    current["stats"] = runtime_stats(records=5000, last_checkpoint_at=None)
    assert get("towerstream_events_consumed_total", {"topic": "towerstream.events"}) == 5000
    assert get("towerstream_model_age_seconds", {"learner": "two-tower"}) is None


def test_learner_collector_survives_a_failing_stats_call() -> None:
    def broken() -> RuntimeStats:
        raise RuntimeError("boom")

    reg = CollectorRegistry()
    reg.register(LearnerStatsCollector(broken))
    assert reg.get_sample_value("towerstream_events_consumed_total", {"topic": "towerstream.events"}) is None


def test_indexer_collector_exports_counters_and_build_histogram() -> None:
    m = IndexerMetrics()
    reg = CollectorRegistry()
    reg.register(IndexerStatsCollector(m, recall_k=100, clock=lambda: 2000.0))
    get = reg.get_sample_value
    assert get("towerstream_index_builds_total") == 0
    assert get("towerstream_index_version") is None and get("towerstream_index_age_seconds") is None
    assert get("towerstream_index_build_seconds_count") == 0
    m.builds_total, m.last_build_seconds, m.index_version, m.last_publish_time = 1, 2.0, 1, 1990.0
    m.last_recall, m.refused_total, m.index_items = 0.96, 2, 500
    assert get("towerstream_index_builds_total") == 1
    assert get("towerstream_index_refused_builds_total") == 2
    assert get("towerstream_index_version") == 1
    assert get("towerstream_index_age_seconds") == 10.0
    assert get("towerstream_index_items") == 500
    assert get("towerstream_index_recall_at_k", {"k": "100"}) == 0.96
    assert get("towerstream_index_quality_auc") is None  # NaN: not measured yet
    assert get("towerstream_index_build_seconds_count") == 1
    assert get("towerstream_index_build_seconds_sum") == 2.0
    assert get("towerstream_index_build_seconds_count") == 1  # a second scrape does not observe again
    m.builds_total, m.last_build_seconds = 3, 4.0  # two builds between scrapes: both observed
    assert get("towerstream_index_build_seconds_count") == 3
    assert get("towerstream_index_build_seconds_sum") == 10.0
    assert get("towerstream_index_build_seconds_bucket", {"le": "2.5"}) == 1


def test_track_reads_the_served_index_and_model_at_scrape_time(fakes: Any) -> None:
    reg = CollectorRegistry()
    metrics = Metrics(registry=reg)
    holder = IndexHolder()
    now = {"t": 5000.0}

    class Source:
        handle: ModelHandle | None = None

        def current(self) -> ModelHandle | None:
            return self.handle

    source = Source()
    metrics.track(source, holder, clock=lambda: now["t"])
    get = reg.get_sample_value
    assert math.isnan(get("towerstream_index_version"))
    h = fakes.flat_handle(4, ["a"], np.ones((1, 4), dtype=np.float32))
    object.__setattr__(h, "manifest", {"published_at": 4990.0})
    holder.swap(h)
    metrics.on_index_swap(h)
    assert get("towerstream_index_version") == 4
    assert get("towerstream_index_age_seconds") == 10.0
    assert get("towerstream_index_info", {"version": "4"}) == 1
    assert get("towerstream_index_swaps_total") == 1
    source.handle = ModelHandle(object(), "two-tower", 1200, created_at=4900.0)
    metrics.on_model_loaded(source.handle)
    now["t"] = 5100.0
    assert get("towerstream_model_age_seconds", {"learner": "two-tower"}) == 200.0
    assert get("towerstream_model_version", {"learner": "two-tower"}) == 1200
    assert get("towerstream_model_reloads_total", {"learner": "two-tower"}) == 1


def test_version_number() -> None:
    assert version_number(7) == 7.0
    assert version_number("v00000012") == 12.0
    assert math.isnan(version_number("none"))


def test_start_metrics_server_serves_metrics_and_probes(fakes: Any) -> None:
    reg = CollectorRegistry()
    Metrics(registry=reg).requests.labels(source="kafka", outcome="ok").inc(3)
    state = {"ready": (False, "no index version published yet")}
    server = start_metrics_server(0, reg, addr="127.0.0.1", ready=lambda: state["ready"])
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, body = fakes.http_get(f"{base}/metrics")
        probes = [fakes.http_get(f"{base}/healthz"), fakes.http_get(f"{base}/readyz")]
        state["ready"] = (True, "serving index version 3")
        probes.append(fakes.http_get(f"{base}/readyz"))
        missing = fakes.http_get(f"{base}/nope")[0]
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    values = {(s.name, s.labels.get("outcome"), s.labels.get("source")): s.value
              for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    assert values[("towerstream_requests_total", "ok", "kafka")] == 3.0
    assert probes == [(200, b"alive\n"), (503, b"no index version published yet\n"),
                      (200, b"serving index version 3\n")]
    assert missing == 404


def test_readiness_checks_of_learner_and_indexer() -> None:
    assert learner_ready(lambda: runtime_stats(records=0))() == (False, "no record consumed yet")
    assert learner_ready(lambda: runtime_stats(records=5))() == (True, "5 records consumed")
    m = IndexerMetrics()
    assert indexer_ready(m)()[0] is False
    m.index_version = 2
    assert indexer_ready(m)() == (True, "serving index version 2")


def test_metric_names_lists_sample_names() -> None:
    names = set().union(*(metric_names(r) for r in all_registries()))
    for expected in ("towerstream_score_latency_seconds_bucket", "towerstream_events_consumed_total",
                     "towerstream_index_info", "towerstream_index_builds_total",
                     "towerstream_prequential_auc", "towerstream_index_build_seconds_bucket"):
        assert expected in names


@pytest.mark.parametrize("dup", ["towerstream_events_consumed", "towerstream_dead_letters"])
def test_one_metrics_object_per_registry(dup: str) -> None:
    reg = CollectorRegistry()
    Metrics(registry=reg)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry=reg)
    assert dup in {f.name for f in reg.collect()}
