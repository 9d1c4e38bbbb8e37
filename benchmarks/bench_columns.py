"""The columnar path against the per-event path, in-process (no Kafka), in events per
CPU-second: decode + validate only, hashed LR predict+learn only, and decode + learn.

Every path runs in every run, taken in turn (so a busy machine hits them alike), each
with a fresh learner; medians over the runs. Anchors measured in the same runs: the
per-event path (``decode_events`` -> ``event_to_x`` dicts -> ``predict_learn_many``), the
column path with the numpy step instead of the compiled kernels (``use_kernels=False``),
and River's logistic regression fed per event (on the first ``--river-events``).

``steady`` stages time a second pass over the same batches with the learner (and its
hasher's caches) kept from the first pass: a long-running learner, whose users and items
it has met before. The first pass is the cold start (the simulator has 10,000 users and
5,000 items; 60,000 events meet most of them a handful of times).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_columns.py --events 60000 --runs 5
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from learners.base import event_to_x
from learners.evaluate import prequential_step
from learners.linear import HashedLogisticRegression
from learners.metrics import PrequentialMetrics
from learners.river_lr import RiverLogisticRegression
from streams.columns import FeatureBlocks, decode_columns
from streams.consumer import tune_gc
from streams.events import Event, decode_events, encode_event
from streams.simulator import ClickSimulator, SimulatorConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=60000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--bits", type=int, default=20)
    ap.add_argument("--river-events", type=int, default=5000)
    args = ap.parse_args()
    raws = [encode_event(e) for e in ClickSimulator(SimulatorConfig(seed=1)).events(max_events=args.events)]
    b = args.batch
    batches = [raws[i:i + b] for i in range(0, len(raws), b)]
    tune_gc()

    def impressions(raw_batch):
        return [e for e in decode_events(raw_batch) if isinstance(e, Event) and e.kind == "impression"]

    xs_b = [([event_to_x(e) for e in imps], np.array([e.label for e in imps])) for imps in map(impressions, batches)]
    blocks = FeatureBlocks()
    cols_b = [decode_columns(raw_batch, blocks)[0].of_kind("impression") for raw_batch in batches]
    n_imps = sum(len(c) for c in cols_b)

    def lr(kernels: bool = True) -> HashedLogisticRegression:
        model = HashedLogisticRegression(bits=args.bits)
        model.use_kernels = kernels
        return model

    def dec_events() -> int:
        for raw_batch in batches:
            decode_events(raw_batch)
        return len(raws)

    def dec_columns() -> int:
        fresh = FeatureBlocks()  # cold: every mapping interned anew in this run
        for raw_batch in batches:
            decode_columns(raw_batch, fresh)
        return len(raws)

    def learn_dicts() -> int:
        model = lr(kernels=False)
        for xs, ys in xs_b:
            model.predict_learn_many(xs, ys)
        return n_imps

    def learn_columns_numpy() -> int:
        model = lr(kernels=False)
        for c in cols_b:
            model.predict_learn_columns(c)
        return n_imps

    def learn_columns() -> int:
        model = lr()
        for c in cols_b:
            model.predict_learn_columns(c)
        return n_imps

    steady_models: dict[str, HashedLogisticRegression] = {}

    def learn_columns_steady() -> tuple[int, float]:
        model = lr()
        for c in cols_b:  # the first pass (untimed): the learner meets the stream's users and items
            model.predict_learn_columns(c)
        t = time.process_time()
        for c in cols_b:
            model.predict_learn_columns(c)
        steady_models["lr"] = model
        return n_imps, time.process_time() - t

    def per_event_end_to_end() -> int:
        model, metrics = lr(kernels=False), PrequentialMetrics()
        for raw_batch in batches:
            imps = impressions(raw_batch)
            prequential_step(model, [event_to_x(e) for e in imps], np.array([e.label for e in imps]), metrics)
        return n_imps

    def columns_end_to_end() -> int:
        model, fresh = lr(), FeatureBlocks()
        for raw_batch in batches:
            model.predict_learn_columns(decode_columns(raw_batch, fresh)[0].of_kind("impression"))
        return n_imps

    def river() -> int:
        model, n = RiverLogisticRegression(), 0
        for xs, ys in xs_b:
            for x, y in zip(xs, ys.tolist()):
                model.predict_proba_one(x)
                model.learn_one(x, y)
                n += 1
                if n >= args.river_events:
                    return n
        return n

    stages = [
        ("decode+validate  per-event (decode_events)", dec_events),
        ("decode+validate  columns (decode_columns, cold blocks)", dec_columns),
        ("LR learn only    per-event dicts (numpy step)", learn_dicts),
        ("LR learn only    columns, numpy step", learn_columns_numpy),
        ("LR learn only    columns, kernels", learn_columns),
        ("LR learn only    columns, kernels, steady (2nd pass)", learn_columns_steady),
        ("decode+LR        per-event path", per_event_end_to_end),
        ("decode+LR        columns path", columns_end_to_end),
        (f"River LR         per event (first {args.river_events})", river),
    ]
    print(f"# bench_columns  {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
          f"  python {platform.python_version()}")
    print(f"# {len(raws):,} simulator events (seed 1), {n_imps:,} impressions, batch {b}, bits {args.bits}, "
          f"FTRL defaults, default crosses, runs {args.runs}; events per CPU-second (impressions for the LR "
          f"stages), median (per run)")
    results: dict[str, list[float]] = {name: [] for name, _ in stages}
    for _ in range(args.runs):
        for name, fn in stages:
            t = time.process_time()
            out = fn()
            n, cpu = out if isinstance(out, tuple) else (out, time.process_time() - t)
            results[name].append(n / cpu)
    for name, vals in results.items():
        print(f"{name:56s} {statistics.median(vals) / 1e3:8.0f}k   {[round(v / 1e3) for v in vals]}")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
