"""Two-tower benchmark: training events/s and item-tower inference items/s.

Data: impressions of the click simulator (``streams.simulator``, seed ``--seed``): user
id + 4 user features, item id + category, tags (multi-valued) and price, position.

* training: a fresh learner per run, ``--warmup`` batches first (first-call costs:
  torch lazy imports, table growth), then ``learn_many`` over ``--events`` events in
  batches of 256 / 1024 / 4096; also the stream step (``predict_proba_many`` then
  ``learn_many``, what the runtime does per micro-batch);
* inference (the item tower alone, features included) over ``--items`` items, after
  training, in these modes:

  - ``dict-pre-columnar``: the dict path as it was (``FeatureEncoder.encode`` + the
    item tower, one call per ``--chunk`` items) - the baseline;
  - ``dict``: ``encode_items`` in calls of ``--chunk`` item dicts (what the indexer runs);
  - ``columns``: ``encode_item_columns`` once over the catalogue as prebuilt columns;
  - ``dicts->columns``: the same, the columns taken out of the dicts inside the timing;
  - ``features-only``: ``FeatureEncoder.encode_columns`` alone (no tower);
  - ``dict-cold`` / ``columns-cold``: on a learner freshly restored from the trained
    state (restore not timed), nothing cached in its encoder - what the indexer runs on
    every new checkpoint.

  ``--catalogue cycle`` repeats the distinct items seen in training up to ``--items``;
  ``distinct`` gives every item its own id (the copies' ids are unknown to the model, as
  for catalogue items never shown), so each id is resolved once per call.

Rates are medians over ``--runs`` runs (inference modes taken in turn within each run),
each as wall-clock events/s and as CPU events/s
(process CPU time): on a machine shared with other jobs the wall rate measures the
neighbours too, the CPU rate (with one torch thread) does not.

    .venv/bin/python benchmarks/bench_two_tower.py
    .venv/bin/python benchmarks/bench_two_tower.py --models two-tower --batches 1024 --runs 5 --json out.json
    .venv/bin/python benchmarks/bench_two_tower.py --skip-training --runs 7 --catalogue distinct
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
from learners.two_tower.updater import INFERENCE_CHUNK  # noqa: E402
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


INFERENCE_MODES = ("dict-pre-columnar", "dict", "columns", "dicts->columns", "features-only", "dict-cold",
                   "columns-cold")


def _item_columns(items: list[dict[str, Any]], fields: tuple[str, ...]) -> tuple[list[Any], dict[str, list[Any]]]:
    return [x.get("item_id") for x in items], {f: [x.get(f) for x in items] for f in fields[1:]}


def bench_inference(name: str, xs, ys, args) -> list[dict[str, Any]]:
    learner = make(name, seed=0)
    for lo in range(0, len(xs), 1024):
        learner.learn_many(xs[lo: lo + 1024], ys[lo: lo + 1024])
    seen: dict[Any, dict[str, Any]] = {}
    for x in xs:
        seen.setdefault(x["item_id"], learner.item_features_of(x))
    catalogue = list(seen.values())
    items = [catalogue[i % len(catalogue)] for i in range(args.items)]
    if args.catalogue == "distinct":
        items = [x if i < len(catalogue) else {**x, "item_id": f"{x['item_id']}#{i}"} for i, x in enumerate(items)]
    ids, columns = _item_columns(items, learner.item_fields)
    state = learner.state_dict()
    chunks = range(0, len(items), args.chunk)

    def restored():
        fresh = make(name, seed=0)
        fresh.load_state_dict(state)
        return fresh

    def pre_columnar() -> None:
        with torch.inference_mode():
            for lo in chunks:
                learner._tower(items[lo: lo + args.chunk], "item")  # the dict path before the columnar one

    def dict_path(lrn=learner) -> None:
        for lo in chunks:
            lrn.encode_items(items[lo: lo + args.chunk])

    modes: dict[str, tuple[Callable[[], Any], Callable[[], None]]] = {
        "dict-pre-columnar": (lambda: None, lambda _: pre_columnar()),
        "dict": (lambda: None, lambda _: dict_path()),
        "columns": (lambda: None, lambda _: learner.encode_item_columns(ids, columns)),
        "dicts->columns": (lambda: None, lambda _: learner.encode_item_columns(*_item_columns(items, learner.item_fields))),
        "features-only": (lambda: None, lambda _: learner.encoder.encode_columns(ids, columns)),
        "dict-cold": (restored, dict_path),
        "columns-cold": (restored, lambda lrn: lrn.encode_item_columns(ids, columns)),
    }
    want = learner.encode_item_columns(ids, columns)
    rates: dict[str, list[tuple[float, float]]] = {mode: [] for mode in args.modes}
    for _ in range(args.runs):  # round robin: a neighbour's burst hits every mode alike
        for mode in args.modes:
            setup, run = modes[mode]
            ctx = setup()
            wall, cpu = timed(lambda: run(ctx))
            rates[mode].append((len(items) / wall, len(items) / cpu))
    out = [{"model": name, "mode": mode, "chunk": args.chunk, "items": len(items), "distinct_items": len(catalogue),
            "items_wall_per_s": statistics.median(r[0] for r in rs),
            "items_cpu_per_s": statistics.median(r[1] for r in rs)} for mode, rs in rates.items()]
    if not np.array_equal(learner.encode_items(items[: args.chunk]), want[: args.chunk]):
        raise SystemExit(f"{name}: encode_items and encode_item_columns disagree")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="two-tower,inttower,dat")
    p.add_argument("--batches", default="256,1024,4096")
    p.add_argument("--events", type=int, default=40_960, help="timed events per training run")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before each timed run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--items", type=int, default=200_000, help="items encoded per inference run")
    p.add_argument("--chunk", type=int, default=16_384, help="items per encode_items call (the dict modes)")
    p.add_argument("--catalogue", choices=("cycle", "distinct"), default="cycle",
                   help="inference items: the trained items repeated, or each with its own id")
    p.add_argument("--modes", default=",".join(INFERENCE_MODES), help="inference modes (comma-separated)")
    p.add_argument("--skip-training", action="store_true", help="inference only")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(INFERENCE_MODES))
    if unknown:
        p.error(f"unknown --modes {unknown}; known: {', '.join(INFERENCE_MODES)}")
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
    print(f"runs {args.runs} (median), {args.events} timed events/run after {args.warmup} warm-up batches; "
          f"inference: {args.items} items ({args.catalogue}), dict calls of {args.chunk}, tower chunks of "
          f"~{INFERENCE_CHUNK}, torch threads {torch.get_num_threads()}\n")
    out: dict[str, Any] = {"settings": vars(args) | {"json": str(args.json), "tower_chunk": INFERENCE_CHUNK,
                                                     "torch_threads": torch.get_num_threads()},
                           "training": [], "inference": []}
    if not args.skip_training:
        print(f"{'model':<10} {'batch':>5} {'learn ev/s':>11} {'(cpu)':>9} {'stream ev/s':>12} {'(cpu)':>9}")
        for name in models:
            for b in batches:
                r = bench_training(name, b, xs, ys, args)
                out["training"].append(r)
                print(f"{name:<10} {b:>5} {r['learn_wall_eps']:>11,.0f} {r['learn_cpu_eps']:>9,.0f} "
                      f"{r['stream_wall_eps']:>12,.0f} {r['stream_cpu_eps']:>9,.0f}", flush=True)
        print()
    print(f"{'model':<10} {'item-tower mode':<19} {'items/s':>11} {'(cpu)':>11}")
    for name in models:
        for r in bench_inference(name, xs, ys, args):
            out["inference"].append(r)
            print(f"{name:<10} {r['mode']:<19} {r['items_wall_per_s']:>11,.0f} {r['items_cpu_per_s']:>11,.0f}",
                  flush=True)
    print(f"\nload avg at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
