"""``towerstream bench``: run every ``benchmarks/*.py`` and write ``BENCHMARKS.md``.

Each benchmark is a script that prints its results; it runs in its own process (so one
benchmark's threads, memory and imports do not colour the next), its output is
captured, and the file gets the machine (CPU model, cores, memory, load, library
versions, date) and every benchmark's command, wall time, exit status and output.
``quick`` passes smaller sizes to the benchmarks this module knows (:data:`QUICK_ARGS`).

>>> [p.stem for p in discover(BENCH_DIR, only=["kafka"])]
['bench_kafka']
"""

from __future__ import annotations

import datetime as _dt
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from streams.errors import ConfigError

__all__ = ["BENCH_DIR", "QUICK_ARGS", "BenchResult", "discover", "run_benchmarks", "render_markdown"]

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"

QUICK_ARGS: dict[str, list[str]] = {
    "bench_index": ["--sizes", "20000", "--runs", "1", "--swaps", "5", "--probe", "200", "--eval", "200",
                    "--single-queries", "200", "--batch", "64"],
    "bench_kafka": ["--events", "20000", "--runs", "1", "--runtime-events", "5000"],
    "bench_learners": ["--events", "50000", "--river-events", "5000", "--runs", "1"],
    "bench_two_tower": ["--events", "8192", "--runs", "1", "--items", "20000", "--batches", "256,1024"],
    "bench_scorer": ["--items", "20000", "--requests", "300", "--train-events", "5000", "--kafka-requests", "300",
                     "--paced-requests", "100"],
}
"""Smaller sizes per benchmark for ``--quick`` (a benchmark not listed runs as is)."""


@dataclass(frozen=True)
class BenchResult:
    """One benchmark run: its command, exit status, wall time and output."""

    name: str
    cmd: tuple[str, ...]
    returncode: int
    seconds: float
    output: str


def discover(directory: Path, only: Sequence[str] = ()) -> list[Path]:
    """The benchmark scripts in ``directory`` (``*.py`` not starting with ``_``), sorted;
    ``only`` keeps those named ``bench_<name>`` or ``<name>``."""
    scripts = sorted(p for p in Path(directory).glob("*.py") if not p.name.startswith("_"))
    if not only:
        return scripts
    wanted = {n.removesuffix(".py") for n in only}
    picked = [p for p in scripts if p.stem in wanted or p.stem.removeprefix("bench_") in wanted]
    missing = wanted - {p.stem for p in picked} - {p.stem.removeprefix("bench_") for p in picked}
    if missing:
        raise ConfigError(f"no benchmark named {', '.join(sorted(missing))}; there are: "
                          f"{', '.join(p.stem for p in scripts)}")
    return picked


def _run_one(script: Path, quick: bool, timeout_s: float) -> BenchResult:
    cmd = (sys.executable, str(script), *(QUICK_ARGS.get(script.stem, []) if quick else []))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              cwd=script.parent.parent, timeout=timeout_s, check=False)
        rc, out = proc.returncode, proc.stdout.decode("utf-8", errors="replace")
    except subprocess.TimeoutExpired as exc:
        rc = 124
        out = (exc.stdout or b"").decode("utf-8", errors="replace") + f"\n[timed out after {timeout_s:g} s]\n"
    return BenchResult(script.stem, cmd, rc, time.monotonic() - t0, out)


def run_benchmarks(scripts: Sequence[Path], *, quick: bool = False, timeout_s: float = 3600.0,
                   out: Path | None = None, stream: TextIO | None = None) -> list[BenchResult]:
    """Run ``scripts`` one after the other; write the markdown to ``out`` after each one
    (a long run interrupted half-way keeps what it measured)."""
    from app.demo import machine_info

    started = _dt.datetime.now(_dt.timezone.utc)
    results: list[BenchResult] = []
    for script in scripts:
        if stream is not None:
            print(f"running {script.name}{' (quick)' if quick else ''} ...", file=stream, flush=True)
        r = _run_one(script, quick, timeout_s)
        results.append(r)
        if stream is not None:
            print(f"  {r.name}: exit {r.returncode} after {r.seconds:.0f} s", file=stream, flush=True)
        if out is not None:
            Path(out).write_text(render_markdown(results, machine_info(), started, quick))
    return results


def render_markdown(results: Sequence[BenchResult], machine: dict, started: _dt.datetime, quick: bool) -> str:
    """``BENCHMARKS.md``: the machine, a summary table, then each benchmark's output."""
    lines = ["# Benchmarks", "",
             f"Written by `towerstream bench{' --quick' if quick else ''}` on "
             f"{started.strftime('%Y-%m-%d %H:%M UTC')}. Numbers are from this machine and the load it "
             "carried at the time; compare runs on the same machine only.", "", "## Machine", ""]
    names = [("cpu", "CPU"), ("cores", "cores"), ("memory_gib", "memory (GiB)"), ("load_avg", "load average"),
             ("platform", "platform"), ("python", "python"), ("torch", "torch"), ("faiss-cpu", "faiss-cpu"),
             ("numpy", "numpy"), ("kafka-python", "kafka-python"), ("confluent-kafka", "confluent-kafka")]
    lines += ["| | |", "|---|---|"]
    for key, label in names:
        value = machine.get(key)
        if isinstance(value, (tuple, list)):
            value = ", ".join(f"{v:.2f}" for v in value)
        lines.append(f"| {label} | {value if value is not None else '-'} |")
    lines += ["", "## Summary", "", "| benchmark | exit | wall s | command |", "|---|---|---|---|"]
    for r in results:
        cmd = " ".join(Path(c).name if i < 2 else c for i, c in enumerate(r.cmd))
        lines.append(f"| {r.name} | {r.returncode} | {r.seconds:.0f} | `{cmd}` |")
    for r in results:
        lines += ["", f"## {r.name}", "", "```", r.output.rstrip(), "```"]
    return "\n".join(lines) + "\n"
