"""Index benchmark: Flat vs IVF-Flat vs IVF-PQ vs HNSW at 100k and 1M items, plus the
service's rebuild+publish time and the hot-swap pause.

Data: unit vectors from a mixture of Gaussians on the sphere (``--clusters`` centres,
Zipf-like cluster sizes, within-cluster spread ``--spread`` relative to the unit
centre), the shape of trained two-tower item vectors; queries are fresh draws of the
same mixture (like user vectors in the same space). Tuning probes and evaluation
queries are disjoint: recall@K is measured on queries the build never saw, against
exact inner-product search.

Per (N, kind), medians over ``--runs`` runs:

* build seconds (train / add / tune nprobe|efSearch / total) and, for IVF, the rebuild
  that reuses the trained centroids; also the process CPU seconds of each, which do not
  grow when other processes share the cores (on an idle 2-core machine the wall time
  is at most the CPU time);
* peak memory: the largest RSS increase during the build (sampled every 2 ms);
* recall@K vs exact search;
* query latency p50/p99: single queries (1 OpenMP thread, as one request thread
  would run them) and batches of ``--batch`` (all threads).

Per N: the service path (catalogue snapshot -> embed -> build -> guardrail -> write +
fsync + sha256 -> publish) for a first build and rebuilds, the embedding being a lookup
of the mixture vectors or, with ``--tower two-tower``, a real two-tower checkpoint's
item tower (trained briefly on synthetic impressions, so its vectors are not the
mixture's); and the swap pause: a thread issues single queries without pause while another thread loads
versions from disk and swaps them in; we report how long ``swap()`` takes and how much
longer than usual the queries that straddle a swap took.

    .venv/bin/python benchmarks/bench_index.py                       # 100k and 1M
    .venv/bin/python benchmarks/bench_index.py --sizes 100000 --runs 1 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.artifacts import ArtifactStore  # noqa: E402
from indexer.build import BuildConfig, build_index, exact_topk, recall_at_k  # noqa: E402
from indexer.catalogue import Catalogue  # noqa: E402
from indexer.guardrail import Guardrail  # noqa: E402
from indexer.handle import IndexHolder, load_handle  # noqa: E402
from indexer.service import FileCheckpointSource, FrozenModel, IndexerService  # noqa: E402
from indexer.testing import labelled_impressions, mixture_of_gaussians  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class PeakRSS:
    """Samples RSS every 2 ms on a thread; ``.peak_delta`` = max RSS - RSS at entry."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def med(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values))) if len(values) else float("nan")


def latency(index: faiss.Index, queries: np.ndarray, k: int, n_single: int, batch: int) -> dict[str, float]:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    single = []
    try:
        for q in queries[:n_single]:
            t = time.perf_counter()
            index.search(q[None, :], k)
            single.append(time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(threads)
    batched = []
    for s in range(0, len(queries) - batch + 1, batch):
        t = time.perf_counter()
        index.search(queries[s:s + batch], k)
        batched.append(time.perf_counter() - t)
    return {
        "single_p50_ms": 1e3 * pct(single, 50), "single_p99_ms": 1e3 * pct(single, 99),
        f"batch{batch}_p50_ms": 1e3 * pct(batched, 50), f"batch{batch}_p99_ms": 1e3 * pct(batched, 99),
        "batched_per_query_us": 1e6 * med(batched) / batch,
    }


def bench_kind(kind: str, vectors: np.ndarray, probe: np.ndarray, evalq: np.ndarray, truth: np.ndarray,
               args: argparse.Namespace) -> dict[str, Any]:
    cfg = BuildConfig(kind=kind, recall_k=args.k, recall_target=args.recall_target, probe_queries=len(probe),
                      pq_m=args.pq_m, hnsw_m=args.hnsw_m, hnsw_ef_construction=args.hnsw_ef)
    # HNSW (minutes) and IVF-PQ (codebook training) run once at large sizes: they are the
    # rejected alternatives, measured for the comparison only.
    runs = 1 if kind == "hnsw" or (kind == "ivf_pq" and len(vectors) >= 500_000) else args.runs
    totals, parts, peaks, reuse, cpu, reuse_cpu = [], [], [], [], [], []
    result = None
    for _ in range(runs):
        result = None
        gc.collect()
        with PeakRSS() as mem:
            c = time.process_time()
            result = build_index(vectors, cfg, queries=probe)
            cpu.append(time.process_time() - c)
        totals.append(result.seconds["total"])
        parts.append(result.seconds)
        peaks.append(mem.peak_delta)
        if result.trained is not None:
            c = time.process_time()
            again = build_index(vectors, cfg, trained=result.trained, queries=probe)
            reuse_cpu.append(time.process_time() - c)
            assert not again.retrained
            reuse.append(again.seconds["total"])
            del again
    assert result is not None
    _, found = result.index.search(evalq, args.k)
    out: dict[str, Any] = {
        "kind": kind,
        "params": dict(result.params),
        "build_s": med(totals),
        "train_s": med([p["train"] for p in parts]),
        "add_s": med([p["add"] for p in parts]),
        "tune_s": med([p["tune"] for p in parts]),
        "rebuild_reusing_centroids_s": med(reuse) if reuse else None,
        "build_cpu_s": med(cpu),
        "rebuild_reusing_centroids_cpu_s": med(reuse_cpu) if reuse_cpu else None,
        "build_peak_rss_mb": max(peaks) / 2**20,  # the first run: later ones reuse freed heap pages
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "index_bytes_mb": len(faiss.serialize_index(result.index)) / 2**20,
        "tuned_recall_on_probe": result.recall,
        f"recall@{args.k}_eval": recall_at_k(found, truth),
        "runs": runs,
    }
    n_single = args.single_queries if kind != "flat" or len(vectors) <= 200_000 else min(args.single_queries, 200)
    out.update(latency(result.index, evalq, args.k, n_single, args.batch))
    return out


class LookupTower:
    """Encoder over precomputed vectors (the benchmark measures indexing, not a tower)."""

    def __init__(self, vectors: np.ndarray, users: np.ndarray) -> None:
        self.vectors, self.users = vectors, users
        self.scale = 1.0

    def encode_items(self, xs):
        rows = np.fromiter((int(x["item_id"][1:]) for x in xs), dtype=np.int64, count=len(xs))
        return self.vectors[rows]

    def encode_users(self, xs):
        rows = np.fromiter((int(x["user_id"][1:]) for x in xs), dtype=np.int64, count=len(xs))
        return self.users[rows]


class StaticSource:
    def __init__(self, encoder: LookupTower) -> None:
        self.encoder, self.generation = encoder, 1

    def stamp(self):
        return self.generation

    def load(self) -> FrozenModel:
        return FrozenModel(encoder=self.encoder, source="bench://precomputed", events_learned=self.generation)


class TwoTowerSource(FileCheckpointSource):
    """A real two-tower checkpoint (trained briefly on synthetic impressions); ``generation``
    is bumped by re-saving it, as a learner does."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from learners.registry import make_learner

        self.learner = make_learner("two-tower", seed=0)
        xs, ys = labelled_impressions(4096, n_items=5000, seed=1)
        for s in range(0, len(xs), 512):
            self.learner.learn_many(xs[s:s + 512], ys[s:s + 512])
        self.generation = 0
        self.save()

    def save(self) -> None:
        from learners.checkpoint import save_checkpoint

        self.generation += 1
        save_checkpoint(self.path, self.learner, {"towerstream.events": {0: self.generation}},
                        events_learned=self.generation)


def bench_service(vectors: np.ndarray, users: np.ndarray, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = len(vectors)
    catalogue = Catalogue()
    real = args.tower == "two-tower"
    for i in range(n):
        catalogue.upsert(f"i{i}", {"topic": f"t{i % 8}"} if real else {})
    rng = np.random.default_rng(5)
    n_users = len(users)
    if real:
        xs, ys_arr = labelled_impressions(2000, n_items=n, seed=6)
        source: Any = TwoTowerSource(root.parent / f"{root.name}-model.ckpt")
    else:
        xs, ys = [], []
        for j in range(2000):
            u, i = j % n_users, int(rng.integers(0, n))
            xs.append({"user_id": f"u{u}", "item_id": f"i{i}"})
            ys.append(int(float(users[u] @ vectors[i]) + 0.2 * rng.normal() > 0.3))
        ys_arr = np.asarray(ys)
        source = StaticSource(LookupTower(vectors, users))
    service = IndexerService(
        ArtifactStore(root, keep=3), catalogue, source,
        build_config=BuildConfig(recall_k=args.k, recall_target=args.recall_target, probe_queries=args.probe),
        guardrail=Guardrail(), held_out=lambda m: (xs, ys_arr), period_s=60.0,
    )
    first, rebuild, first_cpu, rebuild_cpu, phases = [], [], [], [], []
    manifests = []
    for r in range(args.runs + 1):  # the first build trains, the others reuse the centroids
        catalogue.upsert(f"i{r % n}", {"touch": r})  # something changed: a build is due
        if real:
            source.save()  # a new checkpoint, as the learner writes them
        else:
            source.generation += 1
        c = time.process_time()
        outcome = service.build_once()
        cpu_s = time.process_time() - c
        assert outcome.status == "published", outcome.reasons
        (first if r == 0 else rebuild).append(outcome.seconds)
        phases.append(outcome.phases)
        (first_cpu if r == 0 else rebuild_cpu).append(cpu_s)
        manifests.append(outcome.manifest)
    last = manifests[-1]
    return {
        "first_build_publish_s": med(first),
        "rebuild_publish_s": med(rebuild) if rebuild else None,
        "first_build_publish_cpu_s": med(first_cpu),
        "rebuild_publish_cpu_s": med(rebuild_cpu) if rebuild_cpu else None,
        "rebuild_breakdown_s": {k: round(v, 3) for k, v in last["build_seconds"].items()},
        "rebuild_phases_s": {k: round(v, 3) for k, v in phases[-1].items()},
        "index": last["index"],
        "recall_probe": last["recall"]["value"],
        "auc": last["quality"]["auc"],
        "versions": [m["version"] for m in manifests],
        "store": str(root),
    }


def bench_swap(store: ArtifactStore, evalq: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """A query thread runs single queries back to back; the main thread, like the watcher,
    loads a version from disk, swaps it in, and reaps the retired one. Each phase is
    separated by 100 ms so the queries that straddle it can be attributed; a placebo
    event (no work) measures what the machine's own noise does to a straddling query."""
    versions = [v.path for v in store.list_versions()][-2:]
    holder = IndexHolder(load_handle(versions[0]))
    faiss.omp_set_num_threads(1)  # the query thread and the loader share 2 cores
    spans: list[tuple[float, float]] = []
    stop = threading.Event()

    def query_loop() -> None:
        i = 0
        while not stop.is_set():
            q = evalq[i % len(evalq)][None, :]
            t = time.perf_counter()
            holder.search(q, args.k)
            spans.append((t, time.perf_counter()))
            i += 1

    events: dict[str, list[tuple[float, float]]] = {"load": [], "swap": [], "reap": [], "placebo": [],
                                                    "plain_del": []}
    t = threading.Thread(target=query_loop)
    t.start()
    try:
        time.sleep(0.5)
        for s in range(args.swaps):
            a = time.perf_counter()
            handle = load_handle(versions[(s + 1) % 2])
            events["load"].append((a, time.perf_counter()))
            time.sleep(0.1)
            a = time.perf_counter()
            holder.swap(handle, reap=False)  # reaped below, to time it apart
            events["swap"].append((a, time.perf_counter()))
            del handle
            time.sleep(0.1)
            a = time.perf_counter()
            holder.reap()
            events["reap"].append((a, time.perf_counter()))
            time.sleep(0.1)
            a = time.perf_counter()
            events["placebo"].append((a, time.perf_counter()))
            time.sleep(0.1)
            if s < args.swaps // 3:
                # What reap() avoids: dropping a loaded version with a plain del.
                doomed = load_handle(versions[s % 2], verify=False)
                time.sleep(0.1)
                a = time.perf_counter()
                del doomed
                events["plain_del"].append((a, time.perf_counter()))
                time.sleep(0.1)
    finally:
        stop.set()
        t.join()
        faiss.omp_set_num_threads(args.threads)
    starts = np.array([s for s, _ in spans])
    ends = np.array([e for _, e in spans])
    lat = ends - starts
    busy = np.zeros(len(spans), dtype=bool)
    for spans_of_kind in events.values():
        for a, b in spans_of_kind:
            busy |= (starts <= b) & (ends >= a)
    quiet_p50 = float(np.median(lat[~busy]))
    out: dict[str, Any] = {"swaps": args.swaps, "queries": len(spans), "query_quiet_p50_ms": 1e3 * quiet_p50,
                           "query_quiet_p99_ms": 1e3 * pct(lat[~busy], 99), "reaped": holder.reaped}
    for kind, spans_of_kind in events.items():
        excess = []
        for a, b in spans_of_kind:
            hit = (starts <= b) & (ends >= a)
            excess.append(float(lat[hit].max()) - quiet_p50 if hit.any() else 0.0)
        out[kind] = {
            "call_p50_us": 1e6 * pct([b - a for a, b in spans_of_kind], 50),
            "call_p99_us": 1e6 * pct([b - a for a, b in spans_of_kind], 99),
            "straddling_excess_p50_ms": 1e3 * max(0.0, pct(excess, 50)),
            "straddling_excess_p99_ms": 1e3 * max(0.0, pct(excess, 99)),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--kinds", default="flat,ivf_flat,ivf_pq,hnsw")
    p.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW above this many items")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--recall-target", type=float, default=0.95)
    p.add_argument("--probe", type=int, default=200, help="tuning queries (the library default)")
    p.add_argument("--eval", type=int, default=1000, help="evaluation queries (disjoint from tuning)")
    p.add_argument("--single-queries", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--pq-m", type=int, default=16)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--hnsw-ef", type=int, default=80)
    p.add_argument("--threads", type=int, default=faiss.omp_get_max_threads())
    p.add_argument("--no-service", action="store_true")
    p.add_argument("--tower", choices=["lookup", "two-tower"], default="lookup",
                   help="service section: precomputed vectors (lookup) or a real two-tower checkpoint")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one kind, in a fresh process
    p.add_argument("--worker-data", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    if args.worker:
        arrays = {name: np.load(args.worker_data / f"{name}.npy") for name in ("vectors", "probe", "evalq", "truth")}
        row = bench_kind(args.worker, arrays["vectors"], arrays["probe"], arrays["evalq"], arrays["truth"], args)
        print(json.dumps(row, default=str))
        return 0
    forwarded = [a for a in (sys.argv[1:] if argv is None else list(argv))]
    settings = {
        "python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
        "cpus": os.cpu_count(), "omp_threads": args.threads, "loadavg_start": os.getloadavg(),
        "data": f"mixture of {args.clusters} Gaussians on the unit sphere, dim {args.dim}, spread {args.spread}",
        **{k: v for k, v in vars(args).items() if k not in ("json",)},
    }
    print("settings:", json.dumps(settings, default=str))
    report: dict[str, Any] = {"settings": settings, "sizes": {}}
    for n in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        vectors = mixture_of_gaussians(n, args.dim, args.clusters, args.spread, seed=1)
        probe = mixture_of_gaussians(args.probe, args.dim, args.clusters, args.spread, seed=2)
        evalq = mixture_of_gaussians(args.eval, args.dim, args.clusters, args.spread, seed=3)
        truth = exact_topk(evalq, vectors, args.k)
        print(f"\n== N={n:,}: data + exact top-{args.k} in {time.perf_counter() - t:.1f} s")
        rows = []
        data_dir = Path(tempfile.mkdtemp(prefix="bench-index-data-"))
        for name, arr in (("vectors", vectors), ("probe", probe), ("evalq", evalq), ("truth", truth)):
            np.save(data_dir / f"{name}.npy", arr)
        for kind in args.kinds.split(","):
            if kind == "hnsw" and n > args.hnsw_max:
                print(f"  {kind:9} skipped at N={n:,} (> --hnsw-max {args.hnsw_max:,})")
                continue
            # A fresh process per kind, so its peak memory is its own.
            cmd = [sys.executable, __file__, *forwarded, "--worker", kind, "--worker-data", str(data_dir)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"  {kind:9} failed:\n{proc.stderr[-2000:]}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {kind:9} build {row['build_s']:7.2f} s (train {row['train_s']:.2f}, add {row['add_s']:.2f}, "
                  f"tune {row['tune_s']:.2f}; reuse {row['rebuild_reusing_centroids_s'] or 0:.2f}; cpu "
                  f"{row.get('build_cpu_s', float('nan')):.1f}/{row.get('rebuild_reusing_centroids_cpu_s') or 0:.1f})  "
                  f"peak +{row['build_peak_rss_mb']:.0f} MB  recall@{args.k} {row[f'recall@{args.k}_eval']:.4f}  "
                  f"single p50/p99 {row['single_p50_ms']:.2f}/{row['single_p99_ms']:.2f} ms  "
                  f"batch{args.batch} p50/p99 {row[f'batch{args.batch}_p50_ms']:.1f}/"
                  f"{row[f'batch{args.batch}_p99_ms']:.1f} ms  params {row['params']}", flush=True)
        entry: dict[str, Any] = {"kinds": rows}
        if not args.no_service:
            users = mixture_of_gaussians(1000, args.dim, args.clusters, args.spread, seed=4)
            with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
                svc = bench_service(vectors, users, Path(tmp), args)
                print(f"  service   first build+publish {svc['first_build_publish_s']:.2f} s "
                      f"(cpu {svc['first_build_publish_cpu_s']:.1f} s), rebuild+publish "
                      f"{svc['rebuild_publish_s'] or float('nan'):.2f} s (cpu {svc['rebuild_publish_cpu_s'] or 0:.1f} s) "
                      f"phases {svc['rebuild_phases_s']} index {svc['rebuild_breakdown_s']}  "
                      f"index {svc['index']}", flush=True)
                swap = bench_swap(ArtifactStore(tmp), evalq, args)
                print(f"  swap      {swap['swaps']} swaps under {swap['queries']} single queries "
                      f"(quiet p50/p99 {swap['query_quiet_p50_ms']:.2f}/{swap['query_quiet_p99_ms']:.2f} ms); "
                      "straddling-query excess p50/p99 ms, call p50/p99:", flush=True)
                for phase in ("swap", "reap", "load", "placebo", "plain_del"):
                    e = swap[phase]
                    print(f"            {phase:8} excess {e['straddling_excess_p50_ms']:.3f}/"
                          f"{e['straddling_excess_p99_ms']:.3f} ms   call {e['call_p50_us']:.1f}/"
                          f"{e['call_p99_us']:.1f} us", flush=True)
            entry.update(service=svc, swap=swap)
        report["sizes"][n] = entry
        shutil.rmtree(data_dir, ignore_errors=True)
        del vectors, truth
        gc.collect()
    settings["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
