"""Profile the two-tower learn loop in process, as :class:`StreamLearnerRuntime` runs it
per poll but without the broker: JSON records -> ``decode_columns`` -> impressions ->
``ColumnExamples`` -> ``prequential_step`` (predict, metrics, learn; the encoder reads the
fields from the columns). ``--path events`` profiles the per-event path it replaced
(``decode_event`` -> ``event_to_x`` dicts); the unprofiled rate of both paths is printed
in every run. The transport itself (poll) is
measured by ``bench_kafka.py`` (``poll`` stage, 0.5-1M records/s on the 2-core machine) and left out here.

Prints the wall rate (unprofiled, then under cProfile), the top entries by cumulative and
by own time, and the cumulative time of each stage: decode, example dicts, feature
encoding (``learners/two_tower/features.py``), torch forward / backward / optimizers.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_two_tower.py --events 20000
    PYTHONPATH=. .venv/bin/python benchmarks/profile_two_tower.py --learner inttower --top 12
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learners.base import ColumnExamples, event_to_x  # noqa: E402
from learners.evaluate import prequential_step  # noqa: E402
from learners.registry import make_learner  # noqa: E402
from learners.metrics import PrequentialMetrics  # noqa: E402
from streams.columns import decode_columns  # noqa: E402
from streams.consumer import tune_gc  # noqa: E402
from streams.events import decode_event, encode_event  # noqa: E402
from streams.simulator import ClickSimulator, SimulatorConfig  # noqa: E402


def loop_columns(learner: object, values: list[bytes], batch: int) -> int:
    """The runtime's per-poll work on ``values``: decode into columns, impressions, predict+learn."""
    metrics = PrequentialMetrics()
    n = 0
    for i in range(0, len(values), batch):
        imps = decode_columns(values[i:i + batch])[0].of_kind("impression")
        prequential_step(learner, ColumnExamples(imps), imps.label, metrics)
        n += len(imps)
    return n


def loop_events(learner: object, values: list[bytes], batch: int) -> int:
    """The per-event path: decode each record, impressions -> dicts, predict+learn."""
    metrics = PrequentialMetrics()
    n = 0
    for i in range(0, len(values), batch):
        events = [decode_event(v) for v in values[i:i + batch]]
        imps = [e for e in events if e.kind == "impression"]
        xs = [event_to_x(e) for e in imps]
        ys = np.fromiter((e.label for e in imps), dtype=np.int64, count=len(imps))
        prequential_step(learner, xs, ys, metrics)
        n += len(imps)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000, help="simulator events (about 83%% impressions)")
    ap.add_argument("--learner", default="two-tower")
    ap.add_argument("--batch-size", type=int, default=2000, help="records per poll, as bench_kafka")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--path", choices=("columns", "events"), default="columns", help="which path to profile")
    ap.add_argument("--torch-threads", type=int, default=1, help="0: torch's default (one per core)")
    ap.add_argument("--out", type=Path, default=None, help="also dump the raw profile here (pstats)")
    args = ap.parse_args(argv)

    tune_gc()
    if args.torch_threads > 0:
        __import__("torch").set_num_threads(args.torch_threads)
    values = [encode_event(e) for e in ClickSimulator(SimulatorConfig(seed=1)).events(max_events=args.events)]
    print(f"# profile_two_tower  {args.learner}  {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
          f"torch threads {__import__('torch').get_num_threads()}, batch {args.batch_size}, profiled path {args.path}")
    paths = {"columns": loop_columns, "events": loop_events}
    for name, fn in paths.items():
        fn(make_learner(args.learner), values[:2000], args.batch_size)  # import and first-call costs out
        t0, c0 = time.perf_counter(), time.process_time()
        n = fn(make_learner(args.learner), values, args.batch_size)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"unprofiled {name:8s}: {n:,} impressions of {len(values):,} events in {wall:.2f} s: "
              f"{n / wall:,.0f} impressions/s wall, {n / cpu:,.0f} per CPU-s ({1000 * cpu / n:.3f} CPU-s per 1k)")
    loop = paths[args.path]

    prof = cProfile.Profile()
    learner = make_learner(args.learner)
    t0 = time.perf_counter()
    prof.enable()
    loop(learner, values, args.batch_size)
    prof.disable()
    pwall = time.perf_counter() - t0
    print(f"profiled: {n / pwall:,.0f} impressions/s wall (cProfile overhead included)\n")
    if args.out:
        prof.dump_stats(str(args.out))
    st = pstats.Stats(prof)
    total = st.total_tt
    for key, title in (("cumulative", "cumulative"), ("tottime", "own")):
        print(f"## top {args.top} by {title} time (of {total:.2f} s profiled)")
        st.sort_stats(key).print_stats(args.top + (6 if key == "cumulative" else 0))
    # cumulative time of the stages (each a function of the loop; they do not nest)
    stages = (
        ("decode_event (orjson + validation)", "streams/events.py", "decode_event"),
        ("decode_columns (msgspec + validation, interned features)", "streams/columns.py", "decode_columns"),
        ("event_to_x (example dicts)", "learners/base.py", "event_to_x"),
        ("ColumnExamples.column (fields from the columns)", "learners/base.py", "column"),
        ("FeatureEncoder.encode (features.py, fields -> rows)", "two_tower/features.py", "encode"),
        ("EmbeddingStore.init_pending (new rows)", "two_tower/features.py", "init_pending"),
        ("model forward (towers, torch)", "two_tower/model.py", "forward"),
        ("backward (torch autograd)", "~", "<method 'run_backward' of 'torch._C._EngineBase' objects>"),
        ("dense optimizer step (Adam)", "torch/optim/optimizer.py", "wrapper"),
        ("sparse Adagrad on embedding rows", "two_tower/features.py", "adagrad_"),
        ("prequential metrics update", "learners/metrics.py", "update"),
    )
    print("## time by stage (cumulative, of the profiled loop)")
    for title, file_part, func in stages:
        ct = sum(v[3] for (f, _l, fn), v in st.stats.items()  # type: ignore[attr-defined]
                 if fn == func and file_part in f)
        print(f"  {title:<52} {ct:6.3f} s  {100 * ct / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
