"""Item-delta benchmark: what the side index and the id mask cost a query, and what an
applied item event costs the follower.

A base version of N unit vectors (Gaussian mixture on the sphere, the shape of trained
item vectors) is built with ``indexer.build.build_index`` (flat, or IVF with its tuned
``nprobe``, ``ivf_flat``); then M item events are applied through ``indexer.delta.DeltaLog`` (half new
items, half changed base items, which also mask their base vectors, plus M/10
retirements). Per (N, kind, M), medians over ``--runs``:

* single-query latency p50/p99 of ``DeltaHandle.search`` (1 OpenMP thread, as one
  request thread runs it) against the bare base search;
* recall@K of the delta handle against exact search over the same served set (base
  minus hidden plus side items), and the share of new items found when the query is
  aimed at one of them (always 1: the side index is exact);
* apply: milliseconds to build the next handle for one more item event with M already
  applied (the follower's cost per poll: the side arrays and the hidden-label mask are
  rebuilt).

    .venv/bin/python benchmarks/bench_delta.py
    .venv/bin/python benchmarks/bench_delta.py --sizes 100000 --deltas 0,100,1000,5000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import faiss
import numpy as np

from indexer.build import BuildConfig, build_index
from indexer.delta import DeltaLog
from indexer.handle import IndexHandle
from streams.items import ItemEvent


def _mixture(n: int, dim: int, rng: np.random.Generator, clusters: int = 64) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    which = rng.integers(0, clusters, size=n)
    x = centres[which] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _one(n: int, kind: str, m: int, dim: int, k: int, queries: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    base_vecs = _mixture(n, dim, rng)
    ids = np.array([f"i{j}" for j in range(n)])
    built = build_index(base_vecs, BuildConfig(kind=kind, recall_k=k))
    base = IndexHandle(built.index, ids, 1, {})
    vectors: dict[str, np.ndarray] = {f"i{j}": base_vecs[j] for j in range(n)}
    new_vecs = _mixture(m, dim, rng) if m else np.zeros((0, dim), np.float32)
    changed = rng.choice(n, size=m // 2, replace=False) if m else np.zeros(0, dtype=int)
    retired = rng.choice(np.setdiff1d(np.arange(n), changed), size=m // 10, replace=False) if m else []
    events = [ItemEvent("upsert", f"new{j}", 0.0, {"j": j}) for j in range(m - m // 2)]
    events += [ItemEvent("upsert", f"i{j}", 0.0, {"j": -1 - int(j)}) for j in changed]
    events += [ItemEvent("retire", f"i{j}", 0.0) for j in retired]
    table = {f"new{j}": new_vecs[j] for j in range(m - m // 2)}
    table.update({f"i{j}": new_vecs[(m - m // 2 + t) % max(m, 1)] for t, j in enumerate(changed)})

    def encode(xs):
        return np.stack([table.get(x["item_id"], vectors.get(x["item_id"])) for x in xs]).astype(np.float32)

    log_ = DeltaLog(encode, clock=lambda: 0.0)
    handle = log_.apply(log_.rebase(base), events) if events else log_.rebase(base)
    # the served set, exactly
    served = dict(vectors)
    for ev in events:
        if ev.op == "retire":
            served.pop(ev.item_id, None)
        else:
            served[ev.item_id] = table[ev.item_id]
    s_ids = np.array(list(served))
    s_vecs = np.stack(list(served.values())).astype(np.float32)
    exact = faiss.IndexFlatIP(dim)
    exact.add(s_vecs)
    q = _mixture(queries, dim, rng)
    _, truth = exact.search(q, k)
    faiss.omp_set_num_threads(1)
    lat_base, lat_delta = [], []
    hits = 0
    for row in range(queries):
        one = q[row:row + 1]
        t = time.perf_counter()
        base.search(one, k)
        lat_base.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = handle.search(one, k)
        lat_delta.append(time.perf_counter() - t)
        hits += len(set(r.ids[0].tolist()) & set(s_ids[truth[row]].tolist()))
    aimed = 0
    new_ids = [f"new{j}" for j in range(min(m - m // 2, 200))]
    for nid in new_ids:
        aimed += int(handle.search(table[nid][None, :], 1).ids[0, 0] == nid)
    table["one-more"] = new_vecs[0] if m else base_vecs[0]
    t = time.perf_counter()
    log_.apply(handle, [ItemEvent("upsert", "one-more", 0.0, {})])
    apply_ms = (time.perf_counter() - t) * 1e3
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return {"base_p50_us": float(np.percentile(lat_base, 50) * 1e6), "base_p99_us": float(np.percentile(lat_base, 99) * 1e6),
            "delta_p50_us": float(np.percentile(lat_delta, 50) * 1e6),
            "delta_p99_us": float(np.percentile(lat_delta, 99) * 1e6),
            "recall": hits / (queries * k), "aimed_found": aimed / len(new_ids) if new_ids else float("nan"),
            "apply_ms": apply_ms, "side": float(len(handle.side_ids)), "hidden": float(len(handle.hidden))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000", help="base items, comma-separated (default 100000)")
    ap.add_argument("--kinds", default="flat,ivf_flat", help="index kinds (default flat,ivf_flat)")
    ap.add_argument("--deltas", default="0,100,1000,5000", help="item events applied (default 0,100,1000,5000)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--k", type=int, default=100, help="answers per query (the scorer's k_retrieve)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"# bench_delta: dim {args.dim}, k {args.k}, {args.queries} single queries per run, median of "
          f"{args.runs} runs; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}, faiss {faiss.__version__}")
    print("| N | kind | events | side | hidden | base p50/p99 us | delta p50/p99 us | recall@k vs exact | "
          "aimed new found | apply 1 more ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            for m in (int(x) for x in args.deltas.split(",")):
                runs = [_one(n, kind, m, args.dim, args.k, args.queries, seed) for seed in range(args.runs)]
                med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                print(f"| {n:,} | {kind} | {m:,} | {med['side']:,.0f} | {med['hidden']:,.0f} | "
                      f"{med['base_p50_us']:,.0f} / {med['base_p99_us']:,.0f} | "
                      f"{med['delta_p50_us']:,.0f} / {med['delta_p99_us']:,.0f} | {med['recall']:.4f} | "
                      f"{med['aimed_found']:.3f} | {med['apply_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
