"""Kafka benchmark: events/s consumed + decoded end to end, per consumer process, and the
learner runtime's throughput.

Setup: ``--events`` simulator events (JSON, about 300 bytes each, keyed by user) are
produced once to a topic of ``--partitions`` partitions, on ``--bootstrap`` /
``KAFKA_BOOTSTRAP_SERVERS`` or on a :class:`streams.broker.LocalBroker` started in a
temporary directory. Then, for each client (kafka-python, confluent-kafka), medians over
``--runs`` runs, each with a fresh consumer reading every partition from offset 0; the
clock starts at the first record and stops at the last:

* ``poll``: records only (:meth:`Consumer.poll`), the transport's ceiling;
* ``poll + decode``: the real path, :class:`streams.consumer.EventConsumer`:
  ``decode_event`` validates every record (bad ones would be dead-lettered);

and, as the CPU ceiling of validation in this process, ``decode_event`` alone over the
same values in memory (no Kafka). Rates are given per wall second and per CPU second of
the consumer process (all its threads): on a shared machine the second is the stable
one. Learner runtime: :class:`StreamLearnerRuntime` per
``--learners`` (default settings; ``--runs`` runs, each a fresh learner in a fresh group,
checkpoints to a temp dir every 10 s), events learned per second from its first record
to the ``--runtime-events``-th impression learned (the median run), CPU-s per 1k events
and the load average, next to the same learner's predict + learn on the same examples in
memory. The topic must hold more impressions than ``--runtime-events`` (about 83% of
the simulator's events are impressions).

    .venv/bin/python benchmarks/bench_kafka.py
    .venv/bin/python benchmarks/bench_kafka.py --events 100000 --runs 3 --learners ctr,lr --json out.json
    .venv/bin/python benchmarks/bench_kafka.py --events 40000 --runs 3 --runtime-events 30000 \
        --clients confluent --learners ctr,lr,two-tower,inttower
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learners.base import event_to_x  # noqa: E402
from learners.registry import make_learner  # noqa: E402
from learners.runtime import StreamLearnerRuntime  # noqa: E402
from streams.consumer import EventConsumer, tune_gc  # noqa: E402
from streams.deadletter import DeadLetterWriter  # noqa: E402
from streams.events import decode_event, encode_event  # noqa: E402
from streams.simulator import ClickSimulator, SimulatorConfig  # noqa: E402
from streams.topics import Topics, key_for_user  # noqa: E402
from streams.transport import KafkaSettings, TopicPartition, ensure_topics, make_consumer, make_producer  # noqa: E402

CLIENTS = ("kafka-python", "confluent")


def produce(settings: KafkaSettings, topic: str, values: list[tuple[bytes, bytes]], n: int) -> float:
    producer = make_producer(settings)
    t0 = time.perf_counter()
    for i in range(n):
        value, key = values[i % len(values)]
        producer.send(topic, value, key=key)
    producer.flush(120)
    producer.close()
    return n / (time.perf_counter() - t0)


def consume_rate(settings: KafkaSettings, topic: str, partitions: int, n: int, decode: bool | str,
                 batch_size: int) -> tuple[float, float]:
    """Events per wall second and per CPU second of this process (all its threads,
    librdkafka's included), from the first record to the n-th; one consumer reading all
    partitions."""
    consumer = make_consumer(settings, None, max_poll_records=batch_size)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    ec = EventConsumer(consumer, DeadLetterWriter(_NoProducer(), "unused", None), batch_size=batch_size)
    got = 0
    t0 = None
    deadline = time.monotonic() + 600
    try:
        while got < n and time.monotonic() < deadline:
            if decode == "columns":  # the columnar path (streams.columns via poll_columns)
                batch = ec.poll_columns(timeout_s=1.0)
                k = 0 if batch is None else len(batch) + batch.dead_lettered
            elif decode:
                batch = ec.poll_batch(timeout_s=1.0)
                k = 0 if batch is None else len(batch.events) + batch.dead_lettered
            else:
                k = len(consumer.poll(batch_size, 1.0))
            if k and t0 is None:
                t0, c0 = time.perf_counter(), time.process_time()
            got += k
        if got < n:
            raise RuntimeError(f"only {got} of {n} records arrived")
        return got / (time.perf_counter() - t0), got / (time.process_time() - c0)
    finally:
        consumer.close()


class _NoProducer:
    def send(self, *a: Any, **k: Any) -> None:
        raise RuntimeError("the benchmark stream holds no bad record")

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def decode_ceiling(values: list[bytes], repeat: int = 3) -> float:
    """decode_event alone, events per CPU second (best of ``repeat``)."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.process_time()
        for v in values:
            decode_event(v)
        best = max(best, len(values) / (time.process_time() - t0))
    return best


class _FirstRecordClock:
    """Consumer wrapper that notes when the first record arrived."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.first: float | None = None

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list:
        records = self._inner.poll(max_records, timeout_s)
        if records and self.first is None:
            self.first, self.first_cpu = time.perf_counter(), time.process_time()
        return records

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def runtime_rate(settings: KafkaSettings, topics: Topics, learner_name: str, n_events: int,
                 batch_size: int, tmp: Path) -> dict[str, Any]:
    clocks: list[_FirstRecordClock] = []

    def factory(s: KafkaSettings, group: str, n: int) -> Any:
        clocks.append(_FirstRecordClock(make_consumer(s, group, max_poll_records=n)))
        return clocks[-1]

    run_id = uuid.uuid4().hex[:6]  # a fresh group and checkpoint per run: nothing resumes
    rt = StreamLearnerRuntime(settings, make_learner(learner_name), f"bench-{learner_name}-{run_id}",
                              topics, tmp / f"{learner_name}-{run_id}.ckpt", checkpoint_every_s=10.0,
                              batch_size=batch_size, max_events=n_events, consumer_factory=factory)
    stats = rt.run()
    elapsed = time.perf_counter() - clocks[0].first
    cpu = time.process_time() - clocks[0].first_cpu
    return {"events_learned": stats.events_learned_run, "events_per_s": stats.events_learned_run / elapsed,
            "events_per_cpu_s": stats.events_learned_run / cpu,
            "cpu_s_per_1k_events": 1000.0 * cpu / max(stats.events_learned_run, 1),
            "load_average": os.getloadavg(),
            "checkpoints": stats.checkpoints, "auc": stats.metrics.get("auc")}


def learner_ceiling(learner_name: str, xs: list[dict], ys: np.ndarray, batch_size: int) -> float:
    """predict + learn alone in memory, events per CPU second."""
    learner = make_learner(learner_name)
    t0 = time.process_time()
    for i in range(0, len(xs), batch_size):
        bx, by = xs[i:i + batch_size], ys[i:i + batch_size]
        learner.predict_proba_many(bx)
        learner.learn_many(bx, by)
    return len(xs) / (time.process_time() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                    help="Kafka host:port (default: $KAFKA_BOOTSTRAP_SERVERS, else a LocalBroker)")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2000, help="records per poll / micro-batch")
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--learners", default="ctr,lr,two-tower",
                    help="learners of the runtime stage (registry names: ctr, lr, river-lr, two-tower, "
                         "inttower, dat), each with its default settings")
    ap.add_argument("--runtime-events", type=int, default=50_000, help="impressions per learner runtime run")
    ap.add_argument("--runtime-client", default="confluent", choices=CLIENTS)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads for the two-tower family (default 1, as the demo runs "
                         "learners; 0: torch's default, one per core, which collapses under contention on "
                         "a shared 2-core machine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--default-gc", action="store_true",
                    help="keep Python's default GC thresholds (default: streams.consumer.tune_gc, as "
                         "`towerstream learn` does)")
    args = ap.parse_args(argv)

    from streams.broker import bootstrap_or_local

    with bootstrap_or_local(args.bootstrap, prefix="bench-kafka-") as args.bootstrap:
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    env = KafkaSettings.from_env(default_bootstrap=args.bootstrap)  # $TOWERSTREAM_KAFKA_OPTIONS apply
    settings = KafkaSettings(args.bootstrap, env.client, env.options)
    topics = Topics(prefix=f"bench{uuid.uuid4().hex[:8]}")
    sim_events = list(ClickSimulator(SimulatorConfig(seed=1)).events(max_events=min(args.events, 50_000)))
    values = [(encode_event(e), key_for_user(e.user_id)) for e in sim_events]
    learners = [n for n in args.learners.split(",") if n]
    in_topic = sum(sim_events[i % len(sim_events)].kind == "impression" for i in range(args.events))
    if learners and args.runtime_events > in_topic:
        raise SystemExit(f"bench_kafka: --runtime-events {args.runtime_events:,} but the topic will hold only "
                         f"{in_topic:,} impressions of its {args.events:,} events (the runtime would wait for "
                         "more forever): raise --events or lower --runtime-events")
    ensure_topics(settings, {topics.events: args.partitions, topics.dead_letter: 1})
    if args.torch_threads > 0 and any(n in ("two-tower", "inttower", "dat") for n in learners):
        import torch

        torch.set_num_threads(args.torch_threads)
    # Learner ceilings first, so that no example objects stay alive (and scanned by the
    # collector) while the consumers are measured.
    imps = [e for e in sim_events if e.kind == "impression"]
    xs = [event_to_x(e) for e in imps]
    ys = np.array([e.label for e in imps])
    ceilings = {name: learner_ceiling(name, xs, ys, args.batch_size) for name in learners}
    del sim_events, imps, xs, ys
    gc.collect()
    avg_bytes = sum(len(v) for v, _ in values) / len(values)
    load = os.getloadavg()
    print(f"# bench_kafka  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f}  python {platform.python_version()}")
    print(f"# broker {args.bootstrap}  topic {topics.events}: {args.partitions} partitions, {args.events:,} events "
          f"of {avg_bytes:.0f} B  runs {args.runs}  batch {args.batch_size}")
    print(f"# gc: {'Python defaults' if args.default_gc else 'tuned (streams.consumer.tune_gc)'}"
          f"  torch threads: {args.torch_threads or 'default'}")
    if not args.default_gc:
        tune_gc()
    rate = produce(settings.with_client("confluent"), topics.events, values, args.events)
    print(f"produce (confluent, acks=all): {rate:,.0f} events/s")
    results: dict[str, Any] = {"events": args.events, "partitions": args.partitions, "runs": args.runs,
                               "gc": "default" if args.default_gc else "tuned", "torch_threads": args.torch_threads,
                               "batch_size": args.batch_size, "avg_bytes": avg_bytes, "load_average": load,
                               "cpus": os.cpu_count(), "produce_events_per_s": rate, "consume": {}}

    ceiling = decode_ceiling([v for v, _ in values])
    print(f"decode_event alone, in memory (CPU ceiling of validation): {ceiling:,.0f} events per CPU-s")
    results["decode_event_ceiling_events_per_s"] = ceiling

    for client in [c for c in args.clients.split(",") if c]:
        s = settings.with_client(client)  # type: ignore[arg-type]
        row = {}
        for stage, decode in (("poll", False), ("poll+decode", True), ("poll+columns", "columns")):
            runs = [consume_rate(s, topics.events, args.partitions, args.events, decode, args.batch_size)
                    for _ in range(args.runs)]
            wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
            row[stage] = {"median_wall": statistics.median(wall), "median_cpu": statistics.median(cpu),
                          "wall": wall, "cpu": cpu}
            print(f"{client:>12}  {stage:<12} median {statistics.median(wall):>9,.0f} events/s wall, "
                  f"{statistics.median(cpu):>9,.0f} per CPU-s   wall runs {', '.join(f'{r:,.0f}' for r in wall)}")
        results["consume"][client] = row

    results["runtime"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in learners:
            # --runs runs, each a fresh learner in a fresh group; the median run (by wall rate) is reported
            rs = sorted((runtime_rate(settings.with_client(args.runtime_client), topics, name,
                                      args.runtime_events, args.batch_size, Path(tmp)) for _ in range(args.runs)),
                        key=lambda r: r["events_per_s"])
            r = dict(rs[len(rs) // 2])
            r["wall_runs"] = [x["events_per_s"] for x in rs]
            r["learner_in_memory_events_per_s"] = ceilings[name]
            results["runtime"][name] = r
            print(f"runtime {name:<9} ({args.runtime_client}) median {r['events_per_s']:>9,.0f} events learned/s wall, "
                  f"{r['events_per_cpu_s']:,.0f} per CPU-s = {r['cpu_s_per_1k_events']:.3f} CPU-s per 1k "
                  f"({r['events_learned']:,} impressions, {r['checkpoints']} checkpoints, AUC {r['auc']:.3f}, "
                  f"load {r['load_average'][0]:.2f}); "
                  f"predict+learn alone {r['learner_in_memory_events_per_s']:,.0f} per CPU-s; "
                  f"wall runs {', '.join(f'{w:,.0f}' for w in r['wall_runs'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
