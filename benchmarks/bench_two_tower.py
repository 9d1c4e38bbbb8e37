"""Two-tower benchmark: training events/s and item-tower inference items/s.

Data: impressions of the click simulator (``streams.simulator``, seed ``--seed``): user
id + 4 user features, item id + category, tags (multi-valued) and price, position.

* training: a fresh learner per run, ``--warmup`` batches first (first-call costs:
  torch lazy imports, table growth), then ``learn_many`` over ``--events`` events in
  batches of 256 / 1024 / 4096; also the stream step (``predict_proba_many`` then
  ``learn_many``, what the runtime does per micro-batch);
* inference: ``encode_items`` (the item tower alone, features included) over
  ``--items`` item dicts in chunks of ``--chunk``, after training.

Rates are medians over ``--runs`` runs, each as wall-clock events/s and as CPU events/s
(process CPU time): on a machine shared with other jobs the wall rate measures the
neighbours too, the CPU rate (with one torch thread) does not.

    .venv/bin/python benchmarks/bench_two_tower.py
    .venv/bin/python benchmarks/bench_two_tower.py --models two-tower --batches 1024 --runs 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learners.base import event_to_x  # noqa: E402
from learners.two_tower import make  # noqa: E402
from streams.simulator import ClickSimulator, SimulatorConfig  # noqa: E402


def simulated(n: int, seed: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    xs, ys = [], []
    for e in ClickSimulator(SimulatorConfig(seed=seed)).events():
        if e.kind == "impression":
            xs.append(event_to_x(e))
            ys.append(e.label)
            if len(xs) == n:
                break
    return xs, np.array(ys, dtype=np.float64)


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bench_training(name: str, batch: int, xs, ys, args) -> dict[str, Any]:
    learn, stream = [], []
    n_warm = args.warmup * batch
    body = range(n_warm, n_warm + args.events, batch)
    for run in range(args.runs):
        for mode, out in (("learn", learn), ("stream", stream)):
            learner = make(name, seed=run)
            for lo in range(0, n_warm, batch):
                learner.learn_many(xs[lo: lo + batch], ys[lo: lo + batch])

            def go() -> None:
                for lo in body:
                    bx, by = xs[lo: lo + batch], ys[lo: lo + batch]
                    if mode == "stream":
                        learner.predict_proba_many(bx)
                    learner.learn_many(bx, by)

            wall, cpu = timed(go)
            out.append((args.events / wall, args.events / cpu))
    return {
        "model": name, "batch": batch,
        "learn_wall_eps": statistics.median(r[0] for r in learn),
        "learn_cpu_eps": statistics.median(r[1] for r in learn),
        "stream_wall_eps": statistics.median(r[0] for r in stream),
        "stream_cpu_eps": statistics.median(r[1] for r in stream),
    }


def bench_inference(name: str, xs, ys, args) -> dict[str, Any]:
    learner = make(name, seed=0)
    for lo in range(0, len(xs), 1024):
        learner.learn_many(xs[lo: lo + 1024], ys[lo: lo + 1024])
    seen: dict[Any, dict[str, Any]] = {}
    for x in xs:
        seen.setdefault(x["item_id"], learner.item_features_of(x))
    catalogue = list(seen.values())
    items = [catalogue[i % len(catalogue)] for i in range(args.items)]
    rates = []
    for _ in range(args.runs):
        def go() -> None:
            for lo in range(0, len(items), args.chunk):
                learner.encode_items(items[lo: lo + args.chunk])

        wall, cpu = timed(go)
        rates.append((len(items) / wall, len(items) / cpu))
    return {"model": name, "chunk": args.chunk, "distinct_items": len(catalogue),
            "items_wall_per_s": statistics.median(r[0] for r in rates),
            "items_cpu_per_s": statistics.median(r[1] for r in rates)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="two-tower,inttower,dat")
    p.add_argument("--batches", default="256,1024,4096")
    p.add_argument("--events", type=int, default=40_960, help="timed events per training run")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before each timed run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--items", type=int, default=200_000, help="items encoded per inference run")
    p.add_argument("--chunk", type=int, default=16_384, help="items per encode_items call")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    need = max(batches) * args.warmup + args.events
    xs, ys = simulated(need, args.seed)
    defaults = make("two-tower")
    print(f"bench_two_tower: python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")
    print(f"data: simulator seed {args.seed}, {len(xs)} impressions, CTR {ys.mean():.3f}; model defaults: "
          f"field_dim {defaults.field_dim}, hidden {defaults.hidden}, out_dim {defaults.out_dim}, loss {defaults.loss}, "
          f"sparse Adagrad lr {defaults.lr_sparse} + Adam {defaults.lr_dense}")
    print(f"runs {args.runs} (median), {args.events} timed events/run after {args.warmup} warm-up batches\n")
    print(f"{'model':<10} {'batch':>5} {'learn ev/s':>11} {'(cpu)':>9} {'stream ev/s':>12} {'(cpu)':>9}")
    out: dict[str, Any] = {"settings": vars(args) | {"json": str(args.json)}, "training": [], "inference": []}
    for name in models:
        for b in batches:
            r = bench_training(name, b, xs, ys, args)
            out["training"].append(r)
            print(f"{name:<10} {b:>5} {r['learn_wall_eps']:>11,.0f} {r['learn_cpu_eps']:>9,.0f} "
                  f"{r['stream_wall_eps']:>12,.0f} {r['stream_cpu_eps']:>9,.0f}", flush=True)
    print(f"\n{'model':<10} {'item-tower items/s':>19} {'(cpu)':>11}  ({args.items} items, chunks of {args.chunk})")
    for name in models:
        r = bench_inference(name, xs, ys, args)
        out["inference"].append(r)
        print(f"{name:<10} {r['items_wall_per_s']:>19,.0f} {r['items_cpu_per_s']:>11,.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
