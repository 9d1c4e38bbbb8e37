"""End to end on a real Kafka broker: simulated requests in, ranked lists out.

The real scorer process (``ServingApp``) serves a briefly trained two-tower checkpoint
and an index built by the real indexer service. Phase 1: every request gets a ranked
list (none lost), each from one index version; bad records on the requests topic are
dead-lettered with their reason. Phase 2: impressions and clicks of those requests give
the online AUC. Phase 3: the indexer publishes and announces version 2 and later
requests are answered from it. A real Prometheus scrapes the scorer, a real learner
runtime (CTR baseline on the same events) and the indexer throughout.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from indexer import Announcer, ArtifactStore, Catalogue, FileCheckpointSource, IndexerService, ensure_control_topic
from learners.registry import make_learner
from learners.runtime import StreamLearnerRuntime
from serving.app import ServeConfig, ServingApp
from serving.metrics import IndexerStatsCollector, LearnerStatsCollector, learner_ready, start_metrics_server
from streams.deadletter import decode_dead_letter
from streams.events import Event, encode_event
from streams.simulator import ClickSimulator
from streams.topics import DEFAULT_PARTITIONS, Topics, key_for_user
from streams.transport import KafkaSettings, TopicPartition, ensure_topics, make_consumer, make_producer


pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def read_all(settings: KafkaSettings, topic: str, want: int, timeout_s: float = 90.0,
             key: Any = None) -> list[Any]:
    """Read ``topic`` from the beginning until ``want`` distinct keys (or records) arrived."""
    consumer = make_consumer(settings, None)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for(topic)]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, 0)
        out: list[Any] = []
        seen: set[Any] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < want and time.monotonic() < deadline:
            for rec in consumer.poll(1000, 0.5):
                out.append(rec)
                seen.add(key(rec) if key else (rec.partition, rec.offset))
        return out
    finally:
        consumer.close()


def wait_until(cond: Any, timeout_s: float, what: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.2)


def scorer_topics_and_index(kafka_bootstrap: str, art: Any, tmp_path: Path, prefix: str) -> tuple[Any, Any, Path]:
    """``(settings, topics, index_root)`` for a scorer test: fresh topics under a unique
    ``prefix``, the serving topics and the control topic created, and a private copy of the
    fixture's index store (tests publish into it; the shared fixture stays at version 1)."""
    topics = Topics(prefix=f"{prefix}{uuid.uuid4().hex[:8]}")
    settings = KafkaSettings(kafka_bootstrap)
    ensure_topics(settings, {t: DEFAULT_PARTITIONS for t in (topics.requests, topics.events, topics.rankings,
                                                          topics.dead_letter)})
    ensure_control_topic(settings, topics)
    index_root = tmp_path / "index"
    shutil.copytree(art.index_root, index_root)
    return settings, topics, index_root


def test_requests_in_rankings_out(kafka_bootstrap: str, trained_artifacts: Any, prometheus: Any,
                                  tmp_path: Path) -> None:
    art = trained_artifacts
    settings, topics, index_root = scorer_topics_and_index(kafka_bootstrap, art, tmp_path, "e2e")  # phase 3 publishes here

    # The same simulated world the model was trained on, continued past the training events.
    stream = list(ClickSimulator(art.sim_config).events(max_events=4200))
    first = next(n for n in range(3000, len(stream)) if stream[n].kind == "request")
    stream = stream[first:]  # whole requests only: each impression's request is in the stream
    requests = [e for e in stream if e.kind == "request"]
    feedback = [e for e in stream if e.kind != "request"]
    assert len(requests) >= 100

    producer = make_producer(settings)
    app = ServingApp(ServeConfig(checkpoint=art.checkpoint, index_root=index_root, kafka=settings, topics=topics,
                                 host="127.0.0.1", port=0, catalogue=art.catalogue, eval_window_s=0.5,
                                 group_id=f"{topics.prefix}-scorer", eval_group_id=f"{topics.prefix}-eval"),
                     registry=CollectorRegistry())
    learner_reg, indexer_reg = CollectorRegistry(), CollectorRegistry()
    runtime = StreamLearnerRuntime(settings, make_learner("ctr"), f"{topics.prefix}-ctr", topics,
                                   stats_every_s=0.5)
    learner_reg.register(LearnerStatsCollector(runtime, topic=topics.events))
    learner_thread = threading.Thread(target=runtime.run, daemon=True)
    indexer = IndexerService(ArtifactStore(index_root), Catalogue(), FileCheckpointSource(art.checkpoint),
                             announcer=Announcer(producer, topics))
    indexer.start()  # picks up the published version 1
    indexer_reg.register(IndexerStatsCollector(indexer))
    servers = [start_metrics_server(0, learner_reg, addr="127.0.0.1", ready=learner_ready(runtime)),
               start_metrics_server(0, indexer_reg, addr="127.0.0.1")]
    try:
        app.start()
        learner_thread.start()
        prom = prometheus({"scorer": [f"127.0.0.1:{app.port}"], "learners": [f"127.0.0.1:{servers[0].port}"],
                           "indexer": [f"127.0.0.1:{servers[1].port}"]})
        # One scrape of every target before any traffic, so rates have a zero to start from.
        prom.wait_for("up", lambda r: len(r) == 3 and all(x["value"][1] == "1" for x in r))

        # ---- phase 1: requests (and three bad records) in, rankings out
        click = next(e for e in feedback if e.kind == "click")
        bad = {b"{not json": "json", encode_event(click): "kind",
               orjson.dumps({**orjson.loads(encode_event(requests[0])), "schema_version": 99}): "schema_version"}
        for value in bad:
            producer.send(topics.requests, value, key=b"bad")
        for e in requests:
            producer.send(topics.requests, encode_event(e), key=key_for_user(e.user_id))
        producer.flush()
        records = read_all(settings, topics.rankings, len(requests), key=lambda r: r.key)
        rankings = {r.key.decode(): orjson.loads(r.value) for r in records}
        assert set(rankings) == {e.request_id for e in requests}, "a request got no ranked list"
        for e in requests:
            r = rankings[e.request_id]
            assert r["user_id"] == e.user_id
            assert (r["index_version"], r["model_version"], r["learner"]) == (1, art.events_learned, "two-tower")
            assert [i["rank"] for i in r["items"]] == list(range(1, e.k + 1))
            assert {i["item_id"] for i in r["items"]} <= art.index_ids
            scores = [i["score"] for i in r["items"]]
            assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        dead = [decode_dead_letter(r.value) for r in read_all(settings, topics.dead_letter, 3)]
        assert sorted((d.topic, d.reason) for d in dead) == sorted((topics.requests, r) for r in bad.values())
        assert all(d.group_id == f"{topics.prefix}-scorer" for d in dead)

        # ---- phase 2: impressions and clicks of the served requests -> online AUC
        for e in feedback:
            producer.send(topics.events, encode_event(e), key=key_for_user(e.user_id))
        producer.flush()
        n_clicks = sum(e.kind == "click" for e in feedback)
        wait_until(lambda: app.evaluator.stats()["clicks"]["joined"] == n_clicks, 60,
                   lambda: f"{n_clicks} clicks to join: {app.evaluator.stats()}")
        wait_until(lambda: app.evaluator.results().get("two-tower", {}).get("n", 0) > 0, 60, "online evaluation")
        stats = app.evaluator.stats()
        assert stats["impressions"]["not_served"] == 0  # every impression belongs to a request served here
        result = app.evaluator.results()["two-tower"]
        assert 0.0 <= result["auc"] <= 1.0 and result["logloss"] > 0

        # ---- phase 3: the indexer publishes version 2 (one more item) and announces it
        catalogue = Catalogue()
        catalogue.load_jsonl(art.catalogue)
        catalogue.upsert("i-new", {"category": "c0"})
        indexer.catalogue = catalogue
        assert indexer.build_once(trigger="test").status == "published"
        wait_until(lambda: app.holder.version == 2, 30, "the scorer to swap to index version 2")
        later = [Event(kind="request", event_id=f"late{n}", event_time=time.time(), user_id=e.user_id,
                       request_id=f"late-{n}", user_features=e.user_features, k=5) for n, e in enumerate(requests[:20])]
        for e in later:
            producer.send(topics.requests, encode_event(e), key=key_for_user(e.user_id))
        producer.flush()
        records = read_all(settings, topics.rankings, len(requests) + len(later), key=lambda r: r.key)
        late = {r.key.decode(): orjson.loads(r.value) for r in records if r.key.startswith(b"late-")}
        assert set(late) == {e.request_id for e in later}
        assert {r["index_version"] for r in late.values()} == {2}
        assert all({i["item_id"] for i in r["items"]} <= art.index_ids | {"i-new"} for r in late.values())

        # ---- Prometheus saw it all
        n_served = len(requests) + len(later)
        prom.wait_for('towerstream_rankings_produced_total{job="scorer"}',
                      lambda r: len(r) == 1 and float(r[0]["value"][1]) >= n_served)
        prom.wait_for(f'towerstream_consumer_lag_records{{job="scorer",topic="{topics.requests}"}}',
                      lambda r: len(r) == 1 and float(r[0]["value"][1]) == 0)
        for reason in bad.values():
            prom.wait_values(f'towerstream_dead_letters_total{{job="scorer",reason="{reason}"}}', [1.0])
        prom.wait_for('towerstream_index_version{job="scorer"}', lambda r: r and r[0]["value"][1] == "2")
        prom.wait_values('towerstream_index_swaps_total{job="scorer"}', [2.0])  # initial load + v2
        prom.wait_values('towerstream_index_builds_total{job="indexer"}', [1.0])
        auc = prom.wait_for('towerstream_online_auc{job="scorer",learner="two-tower"}', lambda r: len(r) == 1)
        assert 0.0 <= float(auc[0]["value"][1]) <= 1.0
        learned = prom.wait_for('towerstream_events_learned_total{job="learners",learner="ctr"}',
                                lambda r: len(r) == 1 and float(r[0]["value"][1]) > 0)
        assert float(learned[0]["value"][1]) <= sum(e.kind == "impression" for e in feedback)
        p99 = prom.wait_for(
            "histogram_quantile(0.99, sum by (le) (rate(towerstream_score_latency_seconds_bucket[5m])))",
            lambda r: len(r) == 1 and r[0]["value"][1] not in ("NaN", "+Inf"))
        assert float(p99[0]["value"][1]) > 0
    finally:
        runtime.stop()
        if learner_thread.ident is not None:
            learner_thread.join(timeout=30)
        app.stop()
        for s in servers:
            s.shutdown()
            s.server_close()
        producer.close()
    assert np.isfinite(result["auc"])
