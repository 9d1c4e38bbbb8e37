"""Throughput of the learners in-process: events/s for predict + learn.

Each learner runs the prequential loop over the impressions of a simulated stream
(built once, before timing): batched learners in batches of ``--batch`` (one
``prequential_step`` per batch, which uses ``predict_learn_many`` where a learner has
it), River one event at a time (``predict_proba_one`` then ``learn_one``). A run starts
from a fresh learner; the figure is the median of ``--runs`` runs, in wall-clock time
and in process CPU time (the machine may be shared). ``learner`` excludes the metrics,
``+metrics`` includes :class:`~learners.metrics.PrequentialMetrics` updates. The
prebuilt stream is frozen out of the garbage collector's scans (``gc.freeze()``) unless
``--no-gc-freeze``.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_learners.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_learners.py --events 300000 --learners lr ctr
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from learners.evaluate import prequential_step, xy_from_events
from learners.metrics import PrequentialMetrics
from learners.registry import make_learner

# name shown -> (registry name, params, mode)
LEARNERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ctr": ("ctr", {}, "batch"),
    "lr": ("lr", {}, "batch"),
    "lr-sgd": ("lr", {"optimizer": "sgd"}, "batch"),
    "lr-nocross": ("lr", {"crosses": []}, "batch"),
    "river-lr": ("river-lr", {}, "one"),
}


class _NoMetrics:
    def update(self, y_true: Any, p: Any) -> None:
        pass


def _run_batched(learner: Any, xs: list, ys: np.ndarray, batch: int, metrics: Any) -> None:
    for start in range(0, len(xs), batch):
        prequential_step(learner, xs[start : start + batch], ys[start : start + batch], metrics)


def _run_one(learner: Any, xs: list, ys: np.ndarray, batch: int, metrics: Any) -> None:
    ys_int = ys.astype(int).tolist()
    ps = np.empty(len(xs))
    for k, (x, y) in enumerate(zip(xs, ys_int)):
        ps[k] = learner.predict_proba_one(x)
        learner.learn_one(x, y)
    metrics.update(ys, ps)


def _time(make: Callable[[], Any], run: Callable[..., None], xs: list, ys: np.ndarray, batch: int,
          runs: int, with_metrics: bool) -> dict[str, float]:
    wall, cpu = [], []
    for _ in range(runs):
        learner = make()
        metrics = PrequentialMetrics() if with_metrics else _NoMetrics()
        t0, c0 = time.perf_counter(), time.process_time()
        run(learner, xs, ys, batch, metrics)
        wall.append(len(xs) / (time.perf_counter() - t0))
        cpu.append(len(xs) / max(time.process_time() - c0, 1e-9))
    return {"wall_events_per_s": statistics.median(wall), "cpu_events_per_s": statistics.median(cpu)}


def _timed(f: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    # two reference timings, to compare machines (and a busy machine with a quiet one)
    best = min(_timed(lambda: sum(range(1_000_000))) for _ in range(3))
    info["ref_sum_range_1e6_ms"] = round(best * 1e3, 1)
    a, b = np.random.default_rng(0).random((2, 20_000))
    info["ref_numpy_add_20k_us"] = round(min(_timed(lambda: a + b) for _ in range(200)) * 1e6, 1)
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="simulator events (impressions are ~84%%)")
    parser.add_argument("--river-events", type=int, default=30_000, help="impressions for River (slow)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--bits", type=int, default=20, help="hash bits of the hashed LR")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--learners", nargs="*", default=list(LEARNERS),
                        help=f"among {', '.join(LEARNERS)} or any registered name (batched)")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave the prebuilt stream to the garbage collector's scans")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    from streams.simulator import ClickSimulator, SimulatorConfig

    xy = list(xy_from_events(ClickSimulator(SimulatorConfig(seed=args.seed)).events(max_events=args.events)))
    xs = [x for x, _ in xy]
    ys = np.array([y for _, y in xy], dtype=np.float64)
    if not args.no_gc_freeze:  # the stream is built: never rescan it (as `towerstream learn` does)
        gc.collect()
        gc.freeze()
    info = machine_info()
    print(f"settings: simulator seed={args.seed} events={args.events} impressions={len(xs)} "
          f"batch={args.batch} bits={args.bits} runs={args.runs} (median) river_impressions={args.river_events}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"{'learner':12s} {'mode':7s} {'events':>8s} {'learner ev/s (wall / cpu)':>28s} {'+metrics ev/s (wall / cpu)':>29s}")
    results = []
    for shown in args.learners:
        name, params, mode = LEARNERS.get(shown, (shown, {}, "batch"))
        if name == "lr":
            params = {"bits": args.bits, **params}
        n = min(len(xs), args.river_events) if mode == "one" else len(xs)
        run = _run_one if mode == "one" else _run_batched

        def make(name: str = name, params: dict[str, Any] = params) -> Any:
            return make_learner(name, **params)

        bare = _time(make, run, xs[:n], ys[:n], args.batch, args.runs, with_metrics=False)
        full = _time(make, run, xs[:n], ys[:n], args.batch, args.runs, with_metrics=True)
        print(f"{shown:12s} {mode:7s} {n:8d} {bare['wall_events_per_s']:>14,.0f} / {bare['cpu_events_per_s']:>11,.0f} "
              f"{full['wall_events_per_s']:>14,.0f} / {full['cpu_events_per_s']:>11,.0f}", flush=True)
        results.append({"learner": shown, "registry_name": name, "params": params, "mode": mode, "events": n,
                        "learner_only": bare, "with_metrics": full})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "machine": info, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
