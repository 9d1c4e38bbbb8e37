"""``towerstream demo`` and ``towerstream bench``: the main job and the benchmarks.

``demo`` runs the whole pipeline live on this machine: a local Kafka broker (unless
``--bootstrap-servers``), the simulator (or ``--replay`` of MovieLens ratings), the
learners ctr, lr, two-tower and inttower, the indexer and the scorer, each in its own
process with its own ``/metrics``. A table on stderr shows events/s, lag, prequential
AUC per learner, the index version and the scorer's p99 every 2 s. It stops after
``--duration`` seconds of stream, or on Ctrl-C / SIGTERM, leaving nothing running,
and writes ``RUN/report.md`` with plots (``--no-report`` skips it).

``bench`` runs every ``benchmarks/*.py`` and writes ``BENCHMARKS.md`` (machine info
and each benchmark's output).

Examples::

    towerstream demo                                   # 150 s, runs/demo-<timestamp>/
    towerstream demo --duration 60 --rate 1000 --out runs/short
    towerstream demo --replay ../shared/data/ml-100k   # MovieLens instead of the simulator
    towerstream demo --report-only runs/short          # rewrite the report of a finished run
    towerstream bench --quick --only kafka
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from streams.errors import ConfigError

__all__ = ["register"]


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``demo`` and ``bench`` to ``subparsers``."""
    from app.demo import DEFAULT_DURATION_S, DEFAULT_RATE

    p = subparsers.add_parser("demo", help="run the whole pipeline live (broker, simulator, learners, indexer, scorer)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, metavar="SECONDS",
                   help=f"seconds of stream (default {DEFAULT_DURATION_S:g})")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE,
                   help=f"events per second produced (default {DEFAULT_RATE:g})")
    p.add_argument("--seed", type=int, default=7, help="simulator seed (default 7)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="run directory (default runs/demo-<timestamp>)")
    p.add_argument("--replay", type=Path, default=None, metavar="PATH",
                   help="replay MovieLens ratings from this folder instead of simulating (bad lines skipped)")
    p.add_argument("--bootstrap-servers", default=None,
                   help="use this Kafka cluster instead of launching a local broker (topics get a unique prefix)")
    p.add_argument("--no-report", action="store_true", help="do not write report.md and the plots")
    p.add_argument("--report-only", type=Path, default=None, metavar="RUN",
                   help="only (re)write the report of a finished run directory")
    p.add_argument("--index-learner", default="inttower", choices=("two-tower", "inttower"),
                   help="the learner whose item tower is indexed and served (default inttower)")
    p.add_argument("--batch-nice", type=int, default=10, metavar="N",
                   help="niceness of the learners and the indexer, so the request path (producer, broker, "
                        "scorer) gets the CPU first (0..19, default 10; 0: all equal)")
    p.add_argument("--no-item-deltas", action="store_true",
                   help="no item events: new items become retrievable only with the next full rebuild")
    p.set_defaults(func=_demo)

    b = subparsers.add_parser("bench", help="run benchmarks/*.py and write BENCHMARKS.md",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true", help="smaller sizes and single runs (minutes, not hours)")
    b.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this benchmark (bench_kafka, or just kafka); repeatable")
    b.add_argument("--out", type=Path, default=None, metavar="FILE", help="where to write (default BENCHMARKS.md)")
    b.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="per benchmark (default 3600)")
    b.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    b.set_defaults(func=_bench)


def _demo(args: argparse.Namespace) -> int:
    from app.demo import Demo, DemoConfig

    if args.report_only is not None:
        from app.report import write_report

        if not (args.report_only / "timeseries.jsonl").is_file():
            raise ConfigError(f"{args.report_only} holds no timeseries.jsonl: not a demo run directory")
        print(write_report(args.report_only))
        return 0
    out = args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    config = DemoConfig(out=out, duration_s=args.duration, rate=args.rate, seed=args.seed, replay=args.replay,
                        bootstrap_servers=args.bootstrap_servers, report=not args.no_report,
                        index_learner=args.index_learner, batch_nice=args.batch_nice,
                        item_deltas=not args.no_item_deltas)
    return Demo(config, stream=sys.stderr).run()


def _bench(args: argparse.Namespace) -> int:
    from app.bench import BENCH_DIR, discover, run_benchmarks

    scripts = discover(BENCH_DIR, only=args.only)
    if args.list:
        for s in scripts:
            print(s.stem)
        return 0
    out = args.out or BENCH_DIR.parent / "BENCHMARKS.md"
    results = run_benchmarks(scripts, quick=args.quick, timeout_s=args.timeout, out=out, stream=sys.stderr)
    print(f"wrote {out}")
    return 0 if all(r.returncode == 0 for r in results) else 1
