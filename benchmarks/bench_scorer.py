"""Scorer benchmark: retrieve top-K + pre-rank, in-process and through Kafka, at 100k and 1M items.

Model: a real two-tower (``make_learner("two-tower")``: 64-d towers, one 128-unit hidden
layer) trained on ``--train-events`` simulated events, torch on ``--threads`` thread(s) as
``towerstream serve`` runs it. Catalogue: N items with simulator-like features (category,
price, tags); the pre-ranker scores the candidates' real features with the real model.

Vectors (``--vectors``): a briefly trained model has no id rows for a million unseen ids,
so its item vectors are a few thousand distinct feature combinations, not a trained
catalogue. ``mixture`` (default) takes item vectors from the mixture of Gaussians of
``benchmarks/bench_index.py`` (1000 Zipf-sized clusters, spread 1.0, the indexer's
stand-in for trained item vectors) and answers each user with a query from the same
mixture (fixed per user); the user tower still runs for every request, so the encode cost
is real. ``tower`` uses the towers' own vectors, with a per-item random part of weight
``--id-mix`` standing in for id embeddings. Index: the indexer's own choice (:func:`indexer.build.build_index`, ``auto``: exact flat below 50k
items, IVF-Flat above, ``nprobe`` tuned on user vectors to recall@100 >= 0.95). Pre-rank:
the model's ``score_item_side`` on the K candidates (their item-tower outputs computed once per
item and kept: ``serving.scorer.ItemSideCache``), or with ``--no-item-side-cache`` ``score_candidates``
on their item features every time.

In-process (the :class:`serving.scorer.Scorer`, no I/O):

* single requests one after the other: latency p50/p90/p99 of the whole answer, and of
  each stage (encode the user, retrieve top-K, pre-rank K) read from the scorer's own
  Prometheus histogram timings (per-request means);
* batched (``--batch`` requests per ``score_many``): requests/s.

Through Kafka (``--bootstrap`` / ``KAFKA_BOOTSTRAP_SERVERS``, else a LocalBroker in a temp
dir): the real :class:`serving.request_consumer.RequestConsumer` (decode, validate, score,
produce, flush, commit) in a thread; a producer writes request events, a reader consumes
the rankings topic.

* burst: ``--kafka-requests`` requests produced at once: requests/s from the first send
  to the last ranking read;
* paced: requests at ``--rate``/s (default: half the burst throughput, so the loop is
  not saturated): end-to-end latency (request sent -> ranking read) p50/p99,
  which includes kafka-python's fetch wait on both sides.

On a shared machine wall-clock latencies include waiting for a core; the CPU time per
request (process CPU seconds / requests, one thread) is the load-independent figure.

    .venv/bin/python benchmarks/bench_scorer.py                              # 100k and 1M
    .venv/bin/python benchmarks/bench_scorer.py --items 100000 --requests 500 --no-kafka
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from indexer.build import BuildConfig, build_index  # noqa: E402
from indexer.handle import IndexHandle, IndexHolder  # noqa: E402
from indexer.testing import mixture_of_gaussians  # noqa: E402
from learners.base import event_to_x  # noqa: E402
from learners.registry import make_learner  # noqa: E402
from serving.metrics import Metrics  # noqa: E402
from serving.request_consumer import RequestConsumer  # noqa: E402
from serving.scorer import ItemFeatureStore, Scorer, ScoreRequest, StaticLearnerSource  # noqa: E402
from streams.consumer import open_event_consumer  # noqa: E402
from streams.events import Event, encode_event  # noqa: E402
from streams.simulator import ClickSimulator, SimulatorConfig  # noqa: E402
from streams.topics import Topics, key_for_user  # noqa: E402
from streams.transport import KafkaSettings, TopicPartition, ensure_topics, make_consumer, make_producer  # noqa: E402

STAGES = ("encode", "retrieve", "prerank", "total")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def train_model(events: int, seed: int) -> tuple[Any, SimulatorConfig, list[Event]]:
    config = SimulatorConfig(seed=seed, n_users=5000, n_items=5000, drift_every=None)
    stream = list(ClickSimulator(config).events(max_events=events))
    learner = make_learner("two-tower", seed=seed)
    imps = [e for e in stream if e.kind == "impression"]
    for start in range(0, len(imps), 512):
        batch = imps[start:start + 512]
        learner.learn_many([event_to_x(e) for e in batch], np.array([e.label for e in batch]))
    return learner, config, [e for e in stream if e.kind == "request"]


def catalogue(n: int, seed: int) -> tuple[list[str], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 20, n)
    price = rng.choice(["low", "mid", "high"], n, p=[0.5, 0.35, 0.15])
    tags = rng.integers(0, 40, (n, 2))
    ids = [f"b{i}" for i in range(n)]
    xs = [{"item_id": ids[i], "i:category": f"c{cat[i]}", "i:price": str(price[i]),
           "i:tags": (f"t{tags[i, 0]}", f"t{tags[i, 1]}")} for i in range(n)]
    return ids, xs


def item_vectors(learner: Any, xs: list[dict[str, Any]], seed: int, mix: float) -> np.ndarray:
    parts = [learner.encode_items(xs[i:i + 50_000]) for i in range(0, len(xs), 50_000)]
    v = np.concatenate(parts).astype(np.float32)
    noise = np.random.default_rng(seed + 1).normal(size=v.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    v = (1 - mix) * v + mix * noise
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


class MixtureQueries:
    """The learner, except that ``encode_users`` returns a mixture-of-Gaussians query per
    user (after running the real user tower, whose cost is part of the benchmark)."""

    def __init__(self, learner: Any, queries: np.ndarray) -> None:
        self.learner = learner
        self.queries = queries
        self.spec = learner.spec

    def encode_users(self, xs: Any) -> np.ndarray:
        self.learner.encode_users(xs)
        return self.queries[[zlib.crc32(str(x["user_id"]).encode()) % len(self.queries) for x in xs]]

    def score_candidates(self, user_x: Any, item_xs: Any) -> np.ndarray:
        return self.learner.score_candidates(user_x, item_xs)

    # the scorer's precomputed item side (serving.scorer.ItemSideCache); no user_side here:
    # encode_users must return the mixture queries, so pre-ranking runs the user tower again
    def item_side(self, item_xs: Any) -> Any:
        return self.learner.item_side(item_xs)

    def score_item_side(self, users: Any, side: Any, rows: np.ndarray, owners: np.ndarray) -> np.ndarray:
        return self.learner.score_item_side(users, side, rows, owners)


def requests_for(users: list[Event], n: int, k: int) -> list[ScoreRequest]:
    return [ScoreRequest(f"q{i}", users[i % len(users)].user_id, users[i % len(users)].user_features, k)
            for i in range(n)]


def bench_in_process(scorer: Scorer, reg: CollectorRegistry, reqs: list[ScoreRequest], batch: int) -> dict[str, Any]:
    for r in reqs[:50]:  # warm-up: torch and faiss first calls
        scorer.score(r)
    before = {s: (reg.get_sample_value("towerstream_score_latency_seconds_sum", {"stage": s}) or 0.0,
                  reg.get_sample_value("towerstream_score_latency_seconds_count", {"stage": s}) or 0.0)
              for s in STAGES}
    lat = []
    cpu0 = time.process_time()
    for r in reqs:
        t0 = time.perf_counter()
        scorer.score(r)
        lat.append(time.perf_counter() - t0)
    cpu_per_request = (time.process_time() - cpu0) / len(reqs)
    stage_mean = {}
    for s in STAGES:
        total = reg.get_sample_value("towerstream_score_latency_seconds_sum", {"stage": s}) - before[s][0]
        count = reg.get_sample_value("towerstream_score_latency_seconds_count", {"stage": s}) - before[s][1]
        stage_mean[s] = total / count
    t0 = time.perf_counter()
    done = 0
    for i in range(0, len(reqs), batch):
        done += len(scorer.score_many(reqs[i:i + batch]))
    batched_rps = done / (time.perf_counter() - t0)
    return {"single": {"n": len(lat), "p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3,
                       "p99_ms": pct(lat, 99) * 1e3, "max_ms": max(lat) * 1e3,
                       "rps": len(lat) / sum(lat), "cpu_ms_per_request": cpu_per_request * 1e3},
            "stage_mean_ms": {s: v * 1e3 for s, v in stage_mean.items()},
            "batched": {"batch": batch, "rps": batched_rps}}


def bench_kafka(settings: KafkaSettings, scorer: Scorer, users: list[Event], n_burst: int, n_paced: int,
                rate: float | None, k: int, commit_interval_s: float) -> dict[str, Any]:
    topics = Topics(prefix=f"bench{uuid.uuid4().hex[:8]}")
    ensure_topics(settings, {topics.requests: 4, topics.rankings: 4, topics.dead_letter: 1})
    group = f"{topics.prefix}-scorer"
    ec = open_event_consumer(settings, group, [topics.requests], topics.dead_letter, batch_size=256,
                             poll_timeout_s=0.05)
    loop = RequestConsumer(ec, make_producer(settings), scorer, topics=topics, score_batch=64, group_id=group,
                           commit_interval_s=commit_interval_s)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    reader = make_consumer(settings, None)
    parts = [TopicPartition(topics.rankings, p) for p in reader.partitions_for(topics.rankings)]
    reader.assign(parts)
    for tp in parts:
        reader.seek(tp, 0)
    producer = make_producer(settings)
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    reading = threading.Event()

    def read() -> None:  # its own thread: receive times never wait for the sender
        while not reading.is_set():
            for rec in reader.poll(1000, 0.05):
                got.setdefault(rec.key.decode(), time.perf_counter())

    def wait_for(prefix: str, want: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(1 for rid in list(got) if rid.startswith(prefix)) < want and time.monotonic() < deadline:
            time.sleep(0.01)

    def send(i: int, prefix: str) -> None:
        u = users[i % len(users)]
        e = Event(kind="request", event_id=f"{prefix}{i}", event_time=time.time(), user_id=u.user_id,
                  request_id=f"{prefix}{i}", user_features=u.user_features, k=k)
        sent[e.request_id] = time.perf_counter()
        producer.send(topics.requests, encode_event(e), key=key_for_user(e.user_id))

    reader_thread = threading.Thread(target=read, daemon=True)
    reader_thread.start()
    try:
        # Warm-up: group join, first fetches.
        for i in range(20):
            send(i, "w")
        producer.flush()
        wait_for("w", 20, 60)
        # Burst: throughput.
        t0 = time.perf_counter()
        for i in range(n_burst):
            send(i, "b")
        producer.flush()
        wait_for("b", n_burst, 300)
        burst = [t for rid, t in list(got.items()) if rid.startswith("b")]
        burst_rps = len(burst) / (max(burst) - t0) if burst else 0.0
        # Paced: latency, below capacity (default: half the burst throughput).
        rate = rate or max(1.0, 0.5 * burst_rps)
        interval = 1.0 / rate
        start = time.perf_counter()
        for i in range(n_paced):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            send(i, "p")  # the producer's 5 ms linger sends it; no flush per request
        producer.flush()
        wait_for("p", n_paced, 120)
        lat = [got[rid] - sent[rid] for rid in list(got) if rid.startswith("p")]
    finally:
        reading.set()
        reader_thread.join(timeout=10)
        loop.stop()
        thread.join(timeout=30)
        ec.close()
        loop.producer.close()
        producer.close()
        reader.close()
    return {"burst": {"n": len(burst), "sent": n_burst, "rps": burst_rps},
            "paced": {"n": len(lat), "sent": n_paced, "rate": rate, "p50_ms": pct(lat, 50) * 1e3,
                      "p99_ms": pct(lat, 99) * 1e3}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="100000,1000000", help="catalogue sizes, comma-separated")
    ap.add_argument("--requests", type=int, default=2000, help="in-process requests per size")
    ap.add_argument("--k-retrieve", type=int, default=100)
    ap.add_argument("--k", type=int, default=10, help="items returned per request")
    ap.add_argument("--batch", type=int, default=64, help="requests per score_many call (batched throughput)")
    ap.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (towerstream serve uses 1)")
    ap.add_argument("--train-events", type=int, default=20000, help="simulated events the model is trained on")
    ap.add_argument("--vectors", choices=("mixture", "tower"), default="mixture",
                    help="item and query vectors (see the module docstring)")
    ap.add_argument("--id-mix", type=float, default=0.25, help="weight of the per-item random part of item vectors")
    ap.add_argument("--no-kafka", action="store_true", help="in-process only")
    ap.add_argument("--no-item-side-cache", action="store_true",
                    help="pre-rank from each candidate's feature dict every time (the path before the item-side cache)")
    ap.add_argument("--kafka-requests", type=int, default=2000, help="burst size through Kafka")
    ap.add_argument("--paced-requests", type=int, default=500, help="paced requests through Kafka")
    ap.add_argument("--rate", type=float, default=None,
                    help="paced request rate (requests/s; default: half the measured burst throughput)")
    ap.add_argument("--commit-interval", type=float, default=1.0,
                    help="request loop flush+commit interval, seconds (towerstream serve's default 1.0)")
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                    help="Kafka host:port (default: $KAFKA_BOOTSTRAP_SERVERS, else a LocalBroker)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows under nohup/pipes too
    sizes = [int(s) for s in args.items.split(",") if s]

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"load {os.getloadavg()[0]:.2f}; torch threads {args.threads}; K={args.k_retrieve}, k={args.k}")
    t0 = time.perf_counter()
    learner, _, users = train_model(args.train_events, args.seed)
    print(f"# model: two-tower trained on {args.train_events:,} simulated events in {time.perf_counter() - t0:.1f} s")

    broker = None
    settings = None
    if not args.no_kafka:
        if not args.bootstrap:
            from streams.broker import BrokerConfig, LocalBroker

            broker = LocalBroker(BrokerConfig.from_env(port=0, controller_port=0,
                                                       data_dir=Path(tempfile.mkdtemp(prefix="bench-scorer-"))))
            args.bootstrap = broker.start()
        settings = KafkaSettings(args.bootstrap)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": {}}
    try:
        for n in sizes:
            t0 = time.perf_counter()
            ids, xs = catalogue(n, args.seed)
            if args.vectors == "mixture":
                vecs = mixture_of_gaussians(n, 64, 1000, 1.0, seed=1)
                probes = mixture_of_gaussians(500, 64, 1000, 1.0, seed=3)
                model: Any = MixtureQueries(learner, mixture_of_gaussians(5000, 64, 1000, 1.0, seed=2))
            else:
                vecs = item_vectors(learner, xs, args.seed, args.id_mix)
                probes = learner.encode_users([event_to_x(u) for u in users[:500]])
                model = learner
            t_embed = time.perf_counter() - t0
            built = build_index(vecs, BuildConfig(recall_k=args.k_retrieve), queries=probes)
            holder = IndexHolder(IndexHandle(built.index, np.array(ids), 1, {"published_at": time.time()}))
            store = ItemFeatureStore()
            for i, x in zip(ids, xs):
                store.upsert(i, {k[2:]: v for k, v in x.items() if k != "item_id"})
            reg = CollectorRegistry()
            scorer = Scorer(StaticLearnerSource(model, name="two-tower", version=1), holder, k_retrieve=args.k_retrieve,
                            k_default=args.k, item_xs=store, metrics=Metrics(registry=reg),
                            item_side_cache=not args.no_item_side_cache)
            print(f"\n## {n:,} items ({args.vectors} vectors): vectors {t_embed:.1f} s; index {built.kind} {dict(built.params)} "
                  f"recall@{built.recall_k}={built.recall:.3f}, built in {built.seconds['total']:.1f} s")
            reqs = requests_for(users, args.requests, args.k)
            r = bench_in_process(scorer, reg, reqs, args.batch)
            s = r["single"]
            print(f"in-process, single requests (n={s['n']}): p50 {s['p50_ms']:.2f} ms  p90 {s['p90_ms']:.2f} ms  "
                  f"p99 {s['p99_ms']:.2f} ms  max {s['max_ms']:.2f} ms  ({s['rps']:.0f} requests/s on one thread; "
                  f"{s['cpu_ms_per_request']:.2f} CPU ms per request)")
            print("  stage means: " + "  ".join(f"{st} {v:.2f} ms" for st, v in r["stage_mean_ms"].items()))
            print(f"in-process, batched ({args.batch}/call): {r['batched']['rps']:.0f} requests/s")
            row: dict[str, Any] = {"index": {"kind": built.kind, "params": dict(built.params),
                                             "recall": built.recall}, "in_process": r}
            if settings is not None:
                kr = bench_kafka(settings, scorer, users, args.kafka_requests, args.paced_requests, args.rate, args.k,
                                 args.commit_interval)
                b, p = kr["burst"], kr["paced"]
                print(f"through Kafka, burst of {b['sent']}: {b['rps']:.0f} requests/s ({b['n']} rankings read)")
                print(f"through Kafka, paced {p['rate']:.0f}/s (n={p['n']}): end-to-end p50 {p['p50_ms']:.1f} ms  "
                      f"p99 {p['p99_ms']:.1f} ms")
                row["kafka"] = kr
            results["sizes"][str(n)] = row
    finally:
        if broker is not None:
            broker.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
