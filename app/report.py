"""The demo's report: ``RUN/report.md`` with PNG plots, from what the run recorded.

Reads the run directory written by :class:`app.demo.Demo` (``demo.json``,
``timeseries.jsonl``, ``truth.jsonl`` when simulated, ``index_versions.jsonl``,
``index_items.json``) and writes:

* ``auc.png``: rolling (solid) and cumulative (dashed) prequential AUC per learner over
  stream time, drift points marked;
* ``throughput.png``: events/s produced and learned per learner, and consumer lag;
* ``freshness.png``: seconds from a new item's first impression to the first published
  index version that holds it (simulator runs);
* ``latency.png``: the scorer's latency histogram (total stage) at the end, p50/p99;
* ``index_versions.png``: index versions and their item counts over time;
* ``retrieval.png``: Recall@K and NDCG@K of each published version on the indexer's
  held-out clicks over time, served index vs exact search vs popularity (the indexer's
  ``towerstream_index_retrieval`` gauges);
* ``summary.json`` and ``report.md``: the final table (cumulative AUC/logloss per
  learner), whether the expected ordering held, freshness, latency, throughput.

Everything is computed from recorded data; nothing is re-run. Missing pieces (no scorer
started, a replay without ground truth) are said so in the report, not faked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.samples import LEARNERS, consumer_lag, freshness_buckets, histogram_quantile, latency_buckets, sample_key

__all__ = ["RunData", "load_run", "summarize", "write_report"]

_COLORS = {"ctr": "#7f7f7f", "lr": "#1f77b4", "two-tower": "#ff7f0e", "inttower": "#2ca02c", "dat": "#9467bd"}


@dataclass
class RunData:
    """What a demo run left on disk."""

    path: Path
    demo: dict[str, Any]
    samples: list[dict[str, Any]]
    truth: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    item_first: dict[str, list[float]] = field(default_factory=dict)

    @property
    def learners(self) -> list[str]:
        return list(self.demo.get("config", {}).get("learners") or LEARNERS)

    @property
    def t0(self) -> float:
        """Stream start (wall clock): the origin of every time axis."""
        t = self.demo.get("stream_started_at") or self.demo.get("started_at")
        if t:
            return float(t)
        return float(self.samples[0]["t"]) if self.samples else 0.0

    @property
    def drifts(self) -> list[float]:
        return [r["wall_time"] - self.t0 for r in self.truth if r.get("type") == "drift"]

    def final(self, process: str) -> dict[str, float]:
        """The last scrape of ``process`` (the final one when it answered)."""
        for s in reversed(self.samples):
            m = s.get("metrics", {}).get(process)
            if m:
                return m
        return {}

    def series(self, process: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(stream seconds, values) of one sample over the run (an AUC outside [0, 1], which
        cannot be, is left out: :func:`invalid_auc_samples` counts those)."""
        ts, vs = [], []
        for s in self.samples:
            v = s.get("metrics", {}).get(process, {}).get(key)
            if v is not None and not math.isnan(v) and not (_is_auc(key) and not 0.0 <= v <= 1.0):
                ts.append(s["t"] - self.t0)
                vs.append(v)
        return np.asarray(ts), np.asarray(vs)


def _is_auc(key: str) -> bool:
    return key.startswith(("towerstream_prequential_auc", "towerstream_online_auc"))


def invalid_auc_samples(run: RunData) -> dict[str, list[float]]:
    """Scraped AUC values outside [0, 1], per process: a metric read while it was being updated."""
    out: dict[str, list[float]] = {}
    for s in run.samples:
        for process, m in s.get("metrics", {}).items():
            for k, v in m.items():
                if _is_auc(k) and v is not None and not math.isnan(v) and not 0.0 <= v <= 1.0:
                    out.setdefault(process, []).append(v)
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return out


def load_run(path: Path) -> RunData:
    """Read a run directory."""
    path = Path(path)
    demo = json.loads((path / "demo.json").read_text()) if (path / "demo.json").is_file() else {}
    items = json.loads((path / "index_items.json").read_text()) if (path / "index_items.json").is_file() else {}
    return RunData(path=path, demo=demo, samples=_jsonl(path / "timeseries.jsonl"), truth=_jsonl(path / "truth.jsonl"),
                   versions=_jsonl(path / "index_versions.jsonl"), item_first=items)


# --------------------------------------------------------------------------- numbers


def _rate(t: np.ndarray, v: np.ndarray, window_s: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-second rate of a counter over a trailing window (scrapes are a couple of seconds
    apart and a late one would make a spike of a rate between two neighbours)."""
    if len(t) < 2:
        return np.zeros(0), np.zeros(0)
    ts, rs = [], []
    j = 0
    for i in range(1, len(t)):
        while j < i - 1 and t[i] - t[j + 1] >= window_s:
            j += 1
        if t[i] > t[j]:
            ts.append(t[i])
            rs.append(max(0.0, (v[i] - v[j]) / (t[i] - t[j])))
    return np.asarray(ts), np.asarray(rs)


def _produced(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    ts = [(s["t"] - run.t0, s["produced"]) for s in run.samples if s.get("produced") is not None]
    if not ts:
        return np.zeros(0), np.zeros(0)
    t, v = zip(*ts)
    return np.asarray(t, dtype=float), np.asarray(v, dtype=float)


def freshness(run: RunData) -> dict[str, Any]:
    """New items: first impression (ground truth) -> first published index version holding it."""
    new = {r["item_id"]: r["wall_time"] for r in run.truth if r.get("type") == "new_item"}
    if not new:
        return {"available": False, "reason": "no ground truth of new items (replay, or none appeared)"}
    delays = []
    for item, first_seen in new.items():
        hit = run.item_first.get(item)
        if hit is not None:
            delays.append(max(0.0, hit[1] - first_seen))
    out: dict[str, Any] = {"available": True, "new_items": len(new), "indexed": len(delays),
                           "not_indexed": len(new) - len(delays), "seconds": delays}
    if delays:
        d = np.asarray(delays)
        out.update(median_s=float(np.median(d)), p90_s=float(np.percentile(d, 90)), max_s=float(d.max()),
                   min_s=float(d.min()), mean_s=float(d.mean()))
    if run.versions:
        # Steady state: items first shown once an index existed (the others waited for the first build).
        first = min(v["published_at"] for v in run.versions)
        steady = [max(0.0, run.item_first[i][1] - t) for i, t in new.items() if t >= first and i in run.item_first]
        out["after_first_version"] = sum(1 for t in new.values() if t >= first)
        out["steady_seconds"] = steady
        out["first_version_s"] = first - run.t0
        if steady:
            d = np.asarray(steady)
            out.update(steady_indexed=len(steady), steady_median_s=float(np.median(d)),
                       steady_p90_s=float(np.percentile(d, 90)), steady_max_s=float(d.max()))
    return out


def _freshness_stats(buckets: list[tuple[float, float]], total_s: float, budget: float) -> dict[str, Any]:
    count = buckets[-1][1] if buckets else 0.0
    if not count:
        return {"items": 0.0}
    within = next((c for le, c in buckets if abs(le - budget) < 1e-9), None)
    return {"items": count, "mean_s": total_s / count, "within_budget": None if within is None else within / count,
            **{f"p{int(q * 100)}_s": histogram_quantile(q, buckets) for q in (0.5, 0.9, 0.99)}}


def delta_freshness(run: RunData) -> dict[str, Any]:
    """Item event -> retrievable through the scorer's item deltas, from its histogram.

    ``all``: every item, from the last scrape (items announced before the scorer served any
    version count from their event to that first version). ``steady``: the items counted
    after the first scrape in which the scorer served a version (the difference of the two
    cumulative histograms), i.e. the delta path itself once an index exists.
    """
    sc = run.final("scorer")
    buckets = freshness_buckets(sc)
    if not buckets or not sc.get("towerstream_item_freshness_seconds_count"):
        return {"available": False, "reason": "the scorer applied no item delta (item events off, or none arrived)"}
    budget = sc.get("towerstream_item_freshness_budget_seconds", 2.0)
    total = sc.get("towerstream_item_freshness_seconds_sum", 0.0)
    out: dict[str, Any] = {"available": True, "budget_s": budget,
                           "refused": sc.get("towerstream_index_delta_refused_total", 0.0),
                           "delta_seq": sc.get("towerstream_index_delta_seq"),
                           **_freshness_stats(buckets, total, budget)}
    first = next((s for s in run.samples
                  if math.isfinite((s.get("metrics", {}).get("scorer") or {}).get("towerstream_index_version",
                                                                                  math.nan))), None)
    if first is not None:
        m0 = first["metrics"]["scorer"]
        before = dict(freshness_buckets(m0))
        diff = [(le, c - before.get(le, 0.0)) for le, c in buckets]
        out["steady"] = {"from_s": first["t"] - run.t0,
                         **_freshness_stats(diff, total - m0.get("towerstream_item_freshness_seconds_sum", 0.0),
                                            budget)}
    return out


LATENCY_STAGES: tuple[str, ...] = ("fetch", "queue", "encode", "retrieve", "prerank", "total", "end_to_end")


def latency_stages(run: RunData, warmup_s: float = 10.0) -> dict[str, Any]:
    """p50/p90/p99 (ms) of each scorer latency stage in steady state.

    From ``warmup_s`` after the first scrape in which the scorer had answered a request to
    the last scrape (the difference of the two cumulative histograms): the requests held
    while no model or index existed yet, at start-up, would otherwise fill the tail of the
    ``queue`` stages with a wait that is the first build's, not the scorer's.
    """
    scrapes = [(s["t"], s["metrics"]["scorer"]) for s in run.samples if s.get("metrics", {}).get("scorer")]
    first = next((t for t, m in scrapes if latency_buckets(m) and latency_buckets(m)[-1][1] > 0), None)
    if first is None:
        return {}
    start = next(((t, m) for t, m in scrapes if t >= first + warmup_s), None)
    if start is None:
        return {}
    t_start, m_start = start
    t_end, m_end = scrapes[-1]
    out: dict[str, Any] = {"window_s": [t_start - run.t0, t_end - run.t0], "stages": {}}
    for stage in LATENCY_STAGES:
        before = dict(latency_buckets(m_start, stage))
        diff = [(le, c - before.get(le, 0.0)) for le, c in latency_buckets(m_end, stage)]
        if not diff or diff[-1][1] <= 0:
            continue
        out["stages"][stage] = {"requests": diff[-1][1], **{
            f"p{int(q * 100)}_ms": _ms(histogram_quantile(q, diff)) for q in (0.5, 0.9, 0.99)}}
    return out


RETRIEVAL_SEARCHES: tuple[str, ...] = ("served", "flat", "popularity")


def retrieval_key(metric: str, k: int, search: str) -> str:
    """The timeseries key of one retrieval gauge.

    >>> retrieval_key("recall", 50, "flat")
    'towerstream_index_retrieval{k="50",metric="recall",search="flat"}'
    """
    return sample_key("towerstream_index_retrieval", {"metric": metric, "k": str(k), "search": search})


def _retrieval_gauges(ix: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, v in ix.items():
        if not key.startswith("towerstream_index_retrieval{"):
            continue
        labels = dict(part.split("=", 1) for part in key.split("{", 1)[1].rstrip("}").split(","))
        labels = {k: val.strip('"') for k, val in labels.items()}
        out.setdefault(labels["search"], {})[f"{labels['metric']}@{labels['k']}"] = v
    return out


def retrieval(run: RunData) -> dict[str, Any]:
    """The indexer's retrieval gauges: the last measured version (``metrics``: ``{search:
    {"recall@K": v}}``, its ``users`` and ``version``) and, in ``over_run``, the mean over every
    measured version weighted by its users (each version counted once, at its last scrape)."""
    ix = run.final("indexer")
    per_version: dict[float, tuple[float, dict[str, dict[str, float]]]] = {}
    for sample in run.samples:
        m = sample.get("metrics", {}).get("indexer") or {}
        v, users = m.get("towerstream_index_retrieval_version"), m.get("towerstream_index_retrieval_users")
        if v is not None and users:
            per_version[v] = (users, _retrieval_gauges(m))
    total = sum(u for u, _ in per_version.values())
    over: dict[str, dict[str, float]] = {}
    for users, gauges in per_version.values():
        for search, values in gauges.items():
            for key, val in values.items():
                over.setdefault(search, {}).setdefault(key, 0.0)
                over[search][key] += users * val / total
    return {"users": ix.get("towerstream_index_retrieval_users"), "version": ix.get("towerstream_index_retrieval_version"),
            "metrics": _retrieval_gauges(ix),
            "over_run": {"versions": len(per_version), "users": total, "metrics": over}}


def versions_published(run: RunData) -> int:
    return len(run.versions)


def summarize(run: RunData) -> dict[str, Any]:
    """The numbers of the report (also written to ``summary.json``)."""
    learners = {}
    for name in run.learners:
        m = run.final(name)
        lbl = {"learner": name}
        learners[name] = {
            "events_learned": m.get(sample_key("towerstream_model_events_learned", lbl)),
            "auc": m.get(sample_key("towerstream_prequential_auc", {**lbl, "window": "all"})),
            "rolling_auc": m.get(sample_key("towerstream_prequential_auc", {**lbl, "window": "rolling"})),
            "logloss": m.get(sample_key("towerstream_prequential_logloss", {**lbl, "window": "all"})),
            "rolling_logloss": m.get(sample_key("towerstream_prequential_logloss", {**lbl, "window": "rolling"})),
            "lag": consumer_lag(m),
            "dead_letters": sum(v for k, v in m.items() if k.startswith("towerstream_dead_letters_total")),
        }
        t, v = run.series(name, sample_key("towerstream_events_learned_total", lbl))
        busy = _active_rate(t, v)
        learners[name]["events_per_s"] = busy
    matched_n = matched_events(run, learners)
    for name in learners:
        learners[name]["auc_matched"] = auc_at(run, name, matched_n) if matched_n else None
    pt, pv = _produced(run)
    children = run.demo.get("children", {})
    prod = children.get("producer", {})
    produced_total = float(pv[-1]) if len(pv) else None
    produced_rate = None
    if produced_total is not None and prod.get("started_at"):
        end = prod.get("ended_at") or run.demo.get("ended_at")
        if end and end > prod["started_at"]:
            produced_rate = produced_total / (end - prod["started_at"])
    sc = run.final("scorer")
    buckets = latency_buckets(sc) if sc else []
    requests = {k.split("{", 1)[1].rstrip("}"): v for k, v in sc.items()
                if k.startswith("towerstream_requests_total{") and v > 0}
    ix = run.final("indexer")
    idx_learner = run.demo.get("config", {}).get("index_learner", "inttower")
    return {
        "mode": run.demo.get("mode", "simulator"),
        "wall_s": run.demo.get("wall_s"),
        "stop_reason": run.demo.get("stop_reason"),
        "failures": run.demo.get("failures", []),
        "target_rate": run.demo.get("config", {}).get("rate"),
        "duration_s": run.demo.get("config", {}).get("duration_s"),
        "produced_events": produced_total,
        "produced_events_per_s": produced_rate,
        "learners": learners,
        "ordering": ordering(learners),
        "matched_events": matched_n,
        "ordering_matched": ordering(learners, key="auc_matched"),
        "cpu": cpu_usage(run, produced_total),
        "drifts": run.drifts,
        "invalid_auc_samples": invalid_auc_samples(run),
        "freshness": {k: v for k, v in freshness(run).items() if k not in ("seconds", "steady_seconds")},
        "freshness_deltas": delta_freshness(run),
        "index": {
            "versions_published": versions_published(run),
            "builds": ix.get("towerstream_index_builds_total"),
            "refused": ix.get("towerstream_index_refused_builds_total"),
            "failed": ix.get("towerstream_index_failed_builds_total"),
            "items": ix.get("towerstream_index_items"),
            "recall": next((v for k, v in ix.items() if k.startswith("towerstream_index_recall_at_k")), None),
            "learner": idx_learner,
        },
        "retrieval": retrieval(run),
        "scorer": {
            "started": bool(sc),
            "requests": requests,
            "answered_ok": sum(v for k, v in requests.items() if 'outcome="ok"' in k),
            "p50_ms": _ms(histogram_quantile(0.5, buckets)) if buckets else None,
            "p99_ms": _ms(histogram_quantile(0.99, buckets)) if buckets else None,
            "p99_beyond_buckets": beyond_buckets(0.99, buckets),
            "p50_beyond_buckets": beyond_buckets(0.5, buckets),
            "observations": buckets[-1][1] if buckets else 0,
            "online_auc": sc.get(sample_key("towerstream_online_auc", {"learner": idx_learner})),
            "not_served": sc.get(sample_key("towerstream_online_impressions_total", {"outcome": "not_served"})),
            "model_reloads": sc.get(sample_key("towerstream_model_reloads_total", {"learner": idx_learner})),
            "steady": latency_stages(run),
        },
    }


def beyond_buckets(q: float, buckets: list[tuple[float, float]]) -> bool:
    """True when quantile ``q`` lies in the ``+Inf`` bucket (the value is then a lower bound)."""
    finite = [c for b, c in buckets if not math.isinf(b)]
    return bool(buckets) and buckets[-1][1] > 0 and (not finite or finite[-1] < q * buckets[-1][1])


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * 1e3


def _active_rate(t: np.ndarray, v: np.ndarray) -> float | None:
    """Events/s over the span in which the counter moved (start-up excluded)."""
    if len(t) < 2:
        return None
    moving = np.nonzero(np.diff(v) > 0)[0]
    if len(moving) == 0:
        return 0.0
    a, b = moving[0], moving[-1] + 1
    return float((v[b] - v[a]) / (t[b] - t[a])) if t[b] > t[a] else None


def matched_events(run: RunData, learners: dict[str, dict[str, Any]]) -> int | None:
    """The impressions every learner got through: the smallest final ``events_learned``."""
    ns = [m.get("events_learned") for m in learners.values()]
    if not ns or any(n is None or n <= 0 for n in ns):
        return None
    return int(min(ns))


def auc_at(run: RunData, learner: str, n: int) -> float | None:
    """Cumulative prequential AUC of ``learner`` when it had learned ``n`` impressions
    (linear interpolation between scrapes)."""
    lbl = {"learner": learner}
    pts = []
    for s in run.samples:
        m = s.get("metrics", {}).get(learner, {})
        k = m.get(sample_key("towerstream_model_events_learned", lbl))
        a = m.get(sample_key("towerstream_prequential_auc", {**lbl, "window": "all"}))
        if k is not None and a is not None and not math.isnan(a):
            pts.append((k, a))
    if not pts:
        return None
    ks, as_ = zip(*sorted(pts))
    if n < ks[0]:
        return None
    return float(np.interp(n, ks, as_))


def cpu_usage(run: RunData, produced: float | None) -> dict[str, Any]:
    """CPU seconds per process over the run, and per 1,000 events produced."""
    last: dict[str, float] = {}
    for s in run.samples:
        for name, v in (s.get("cpu_s") or {}).items():
            last[name] = max(v, last.get(name, 0.0))
    total = sum(last.values())
    per_k = {n: (v / produced * 1000.0 if produced else None) for n, v in last.items()}
    out: dict[str, Any] = {"seconds": last, "total_s": total, "per_1000_events_s": per_k}
    if produced:
        out["total_per_1000_events_s"] = total / produced * 1000.0
    # Steady state: from the first scrape with every process up and events flowing to the
    # last scrape in which events were still produced (start-up and drain left out).
    rows = [r for r in run.samples if r.get("produced") is not None and r.get("cpu_s")]
    flowing = [i for i in range(1, len(rows)) if rows[i]["produced"] > rows[i - 1]["produced"]]
    if len(flowing) >= 3:
        names = [n for n in last if n != "demo"]
        a = next((i - 1 for i in flowing if all(n in rows[i - 1]["cpu_s"] for n in names)), None)
        b = flowing[-1]
        if a is not None and b > a and rows[b]["produced"] > rows[a]["produced"]:
            events = rows[b]["produced"] - rows[a]["produced"]
            secs = rows[b]["t"] - rows[a]["t"]
            used = {n: rows[b]["cpu_s"].get(n, 0.0) - rows[a]["cpu_s"].get(n, 0.0) for n in last}
            out["steady"] = {"seconds": secs, "events": events, "events_per_s": events / secs,
                             "cores_used": sum(used.values()) / secs,
                             "per_1000_events_s": {n: v / events * 1000.0 for n, v in used.items()},
                             "total_per_1000_events_s": sum(used.values()) / events * 1000.0}
    return out


def ordering(learners: dict[str, dict[str, Any]], key: str = "auc") -> list[dict[str, Any]]:
    """The expected ordering of prequential AUC (``key``: ``auc`` cumulative, or
    ``auc_matched`` at equal events), pair by pair, as it came out."""
    checks = [("two-tower", ">", "lr"), ("lr", ">", "ctr"), ("inttower", ">=", "two-tower")]
    out = []
    for a, op, b in checks:
        if a not in learners or b not in learners:
            continue
        x, y = learners[a].get(key), learners[b].get(key)
        held = None if x is None or y is None else (x > y if op == ">" else x >= y)
        out.append({"claim": f"{a} {op} {b}", "left": x, "right": y, "held": held})
    return out


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _mark_drifts(ax: Any, drifts: list[float]) -> None:
    for i, d in enumerate(drifts):
        ax.axvline(d, color="crimson", linestyle=":", linewidth=1.5, label="drift" if i == 0 else None)


def _impression_share(run: RunData) -> float | None:
    """Impressions per produced event (to place drift points on an impressions axis)."""
    t, v = _produced(run)
    if not len(v) or v[-1] <= 0:
        return None
    best = 0.0
    for name in run.learners:
        m = run.final(name)
        if consumer_lag(m) == 0:
            best = max(best, m.get(sample_key("towerstream_model_events_learned", {"learner": name}), 0.0))
    return best / v[-1] if best > 0 else None


def plot_auc(run: RunData, path: Path) -> None:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 8))
    for name in run.learners:
        c = _COLORS.get(name)
        lbl = {"learner": name}
        roll_key = sample_key("towerstream_prequential_auc", {**lbl, "window": "rolling"})
        all_key = sample_key("towerstream_prequential_auc", {**lbl, "window": "all"})
        t, v = run.series(name, roll_key)
        ax.plot(t, v, color=c, linewidth=2, label=f"{name} rolling")
        t, v = run.series(name, all_key)
        ax.plot(t, v, color=c, linewidth=1, linestyle="--", alpha=0.7, label=f"{name} cumulative")
        pts_r: list[tuple[float, float]] = []
        pts_a: list[tuple[float, float]] = []
        for smp in run.samples:
            m = smp.get("metrics", {}).get(name, {})
            n = m.get(sample_key("towerstream_model_events_learned", lbl))
            for key, out in ((roll_key, pts_r), (all_key, pts_a)):
                v = m.get(key)
                if n is not None and v is not None and 0.0 <= v <= 1.0:
                    out.append((n, v))
        for pts, style in ((pts_r, {"linewidth": 2, "label": f"{name} rolling"}),
                           (pts_a, {"linewidth": 1, "linestyle": "--", "alpha": 0.7, "label": f"{name} cumulative"})):
            if pts:
                n, v = zip(*pts)
                ax2.plot(n, v, color=c, **style)
    _mark_drifts(ax, run.drifts)
    share = _impression_share(run) if run.drifts else None
    if share:
        _mark_drifts(ax2, [r["event_index"] * share for r in run.truth if r.get("type") == "drift"])
    ax.set_xlabel("seconds since the stream started (wall clock, scrape time)")
    ax.set_ylabel("prequential ROC AUC")
    ax.set_title("Prequential AUC per learner over time" + ("" if run.drifts else " (no drift: replay)"))
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    ax2.set_xlabel("impressions learned by the learner (a lagging learner is further left)")
    ax2.set_ylabel("prequential ROC AUC")
    bad = sum(len(v) for v in invalid_auc_samples(run).values())
    if bad:
        fig.text(0.01, 0.005, f"{bad} scraped AUC value(s) outside [0, 1] left out (see the report)", fontsize=7,
                 color="crimson")
    ax2.set_title("The same against each learner's own position in the stream" +
                  (" (drift positions approximate)" if share else ""))
    ax2.legend(loc="lower right", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_throughput(run: RunData, path: Path) -> None:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    t, v = _produced(run)
    rt, rv = _rate(t, v)
    if len(rt):
        ax.plot(rt, rv, color="black", linewidth=1.5, label="produced (all events)")
    for name in run.learners:
        lbl = {"learner": name}
        t, v = run.series(name, sample_key("towerstream_events_learned_total", lbl))
        rt, rv = _rate(t, v)
        ax.plot(rt, rv, color=_COLORS.get(name), label=f"{name} learned (impressions)")
        lt, lv = [], []
        for s in run.samples:
            lag = consumer_lag(s.get("metrics", {}).get(name, {}))
            if lag is not None:
                lt.append(s["t"] - run.t0)
                lv.append(lag)
        ax2.plot(lt, lv, color=_COLORS.get(name), label=name)
    _mark_drifts(ax, run.drifts)
    ax.set_xlim(left=-10)
    ax.set_ylabel("events / s (10 s windows)")
    ax.set_title("Throughput: events produced, impressions learned per learner")
    ax.legend(fontsize=8, loc="upper right")
    ax2.set_ylabel("consumer lag (records)")
    ax2.set_xlabel("seconds since the stream started")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_freshness(run: RunData, fresh: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if not fresh.get("available") or not fresh.get("seconds"):
        reason = fresh.get("reason") or "no new item reached an index version before the run ended"
        ax.text(0.5, 0.5, f"No freshness data:\n{reason}", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        d = np.asarray(fresh["seconds"])
        steady = np.asarray(fresh.get("steady_seconds") or [])
        bins = np.linspace(0.0, max(1.0, float(d.max())) * 1.02, 31)
        ax.hist(d, bins=bins, color="#bbbbbb", edgecolor="white", label="all new items")
        if len(steady):
            ax.hist(steady, bins=bins, color="#2ca02c", alpha=0.85, edgecolor="white",
                    label="first shown after the first index version")
            d = steady
        for q, style in ((50, "-"), (90, "--")):
            x = float(np.percentile(d, q))
            which = " (green)" if len(steady) else ""
            ax.axvline(x, color="black", linestyle=style, label=f"p{q} = {x:.1f} s{which}")
        ax.set_xlabel("seconds from a new item's first impression to the first index version holding it")
        ax.set_ylabel("new items")
        ax.set_title(f"Index freshness: {fresh['indexed']} of {fresh['new_items']} new items indexed "
                     f"({fresh['not_indexed']} not yet when the run ended)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(run: RunData, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    buckets = latency_buckets(run.final("scorer"))
    if not buckets or buckets[-1][1] <= 0:
        ax.text(0.5, 0.5, "No scorer latency recorded\n(the scorer did not start or answered no request)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        bounds = [b for b, _ in buckets]
        counts = np.diff([0.0] + [c for _, c in buckets])
        labels = []
        prev = 0.0
        for b in bounds:
            labels.append(f">{prev * 1e3:g}" if math.isinf(b) else f"{prev * 1e3:g}-{b * 1e3:g}")
            prev = b if not math.isinf(b) else prev
        x = np.arange(len(counts))
        ax.bar(x, counts, color="#1f77b4")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("scoring latency per request, total stage (ms; Prometheus histogram buckets;\n"
                      "each request observes the time of the batch it was scored in)")
        ax.set_ylabel("requests")
        p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
        gt50 = "> " if beyond_buckets(0.5, buckets) else ""
        gt99 = "> " if beyond_buckets(0.99, buckets) else ""
        ax.set_title(f"Scorer latency: {int(buckets[-1][1]):,} requests, p50 {gt50}{p50 * 1e3:.2f} ms, "
                     f"p99 {gt99}{p99 * 1e3:.2f} ms")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_index_versions(run: RunData, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if not run.versions:
        ax.text(0.5, 0.5, "No index version was published", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        vs = sorted(run.versions, key=lambda r: r["version"])
        t = [r["published_at"] - run.t0 for r in vs]
        ax.step(t, [r["version"] for r in vs], where="post", color="#9467bd", linewidth=2, label="version published")
        ax.plot(t, [r["version"] for r in vs], "o", color="#9467bd")
        st, sv = run.series("scorer", "towerstream_index_version")
        if len(st):
            ax.step(st, sv, where="post", color="black", linestyle="--", linewidth=1, label="version served (scorer)")
        ax.set_ylabel("index version")
        ax2 = ax.twinx()
        ax2.plot(t, [r["item_count"] for r in vs], color="#8c564b", marker="s", markersize=3, linewidth=1,
                 label="items in the version")
        ax2.set_ylabel("items", color="#8c564b")
        ax2.grid(False)
        _mark_drifts(ax, run.drifts)
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if run.samples:
            ax.set_xlim(0, max(run.samples[-1]["t"] - run.t0, max(t)) + 2)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.set_xlabel("seconds since the stream started")
        ax.set_title(f"Index versions over time ({len(vs)} published)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_retrieval(run: RunData, path: Path, recall_k: int = 50, ndcg_k: int = 10) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"served": ("-", 2.0), "flat": ("--", 1.2), "popularity": (":", 1.5)}
    drawn = 0
    for ax, metric, k in ((axes[0], "recall", recall_k), (axes[1], "ndcg", ndcg_k)):
        for search in RETRIEVAL_SEARCHES:
            t, v = run.series("indexer", retrieval_key(metric, k, search))
            if len(t):
                ls, lw = styles[search]
                ax.plot(t, v, linestyle=ls, linewidth=lw, marker="o" if len(t) < 30 else None, markersize=3,
                        label={"served": "served index", "flat": "exact (flat) search",
                               "popularity": "popularity"}[search])
                drawn += 1
        ax.set_title(f"{'Recall' if metric == 'recall' else 'NDCG'}@{k} on the held-out clicks")
        ax.set_xlabel("seconds since the stream started")
        ax.set_ylim(bottom=0)
        _mark_drifts(ax, run.drifts)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
    if not drawn:
        for ax in axes:
            ax.text(0.5, 0.5, "No retrieval gauges were scraped\n(no index version measured)", ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def _n(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _verdicts(checks: list[dict[str, Any]]) -> list[str]:
    out = []
    for o in checks:
        verdict = {True: "held", False: "**did not hold**", None: "unknown (missing numbers)"}[o["held"]]
        out.append(f"- {o['claim']}: {_n(o['left'])} vs {_n(o['right'])}: {verdict}")
    return out


def _markdown(run: RunData, s: dict[str, Any]) -> str:
    cfg = run.demo.get("config", {})
    machine = run.demo.get("machine", {})
    if s["mode"] == "replay":
        src = f"MovieLens replay of `{cfg.get('replay')}` (bad lines skipped; no drift ground truth)"
    else:
        src = (f"click simulator, seed {cfg.get('seed')}, drift every {run.demo.get('drift_every'):,} events, "
               f"{run.demo.get('new_item_rate'):.4g} new items per event")
    load = ", ".join(f"{x:.1f}" for x in machine.get("load_avg", []))
    lines = [
        f"# towerstream demo report: {run.path.name}", "",
        f"- Source: {src}",
        f"- Stream: target {_n(s['target_rate'], ',.0f')} events/s for {_n(s['duration_s'], 'g')} s; produced "
        f"{_n(s['produced_events'], ',.0f')} events, **{_n(s['produced_events_per_s'], ',.0f')} events/s achieved**",
        f"- Wall time of the demo: {_n(s['wall_s'], '.0f')} s (broker start, process start-up and shutdown "
        f"included); it ended because {s['stop_reason']}",
        f"- Kafka: {run.demo.get('bootstrap')} "
        f"({'a local broker started by the demo' if run.demo.get('local_broker') else 'an existing cluster'}), "
        f"topic prefix `{run.demo.get('topic_prefix')}`, client {run.demo.get('kafka_client', '?')}",
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('memory_gib', '?')} GiB; "
        f"load average at the end {load}",
    ]
    if s["failures"]:
        lines.append(f"- **Failures:** {'; '.join(s['failures'])}")
    n = s.get("matched_events")
    lines += ["", "## Learners", "",
              "Prequential: each impression is scored before the learner learns it. The cumulative columns cover "
              "everything each learner learned; a learner that fell behind (final lag > 0) learned fewer "
              f"impressions, so the last AUC column compares all of them at the same count "
              f"({_n(n, ',.0f')} impressions, each learner's own first ones).", "",
              "| learner | impressions learned | cumulative AUC | rolling AUC | cumulative logloss | "
              "learned events/s | final lag | AUC at equal count |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in s["learners"].items():
        lines.append(f"| {name} | {_n(m['events_learned'], ',.0f')} | {_n(m['auc'])} | {_n(m['rolling_auc'])} | "
                     f"{_n(m['logloss'])} | {_n(m['events_per_s'], ',.0f')} | {_n(m['lag'], ',.0f')} | "
                     f"{_n(m.get('auc_matched'))} |")
    held = [o["held"] for o in s["ordering"]]
    held_m = [o["held"] for o in s["ordering_matched"]]
    lines += ["", "Expected ordering (two-tower > LR > CTR, IntTower >= two-tower) of the final cumulative AUC, "
              "as it came out:", "", *_verdicts(s["ordering"]), "",
              "The same at an equal count of impressions:", "", *_verdicts(s["ordering_matched"]), ""]
    if held and all(held):
        lines.append("The expected ordering held.")
    elif held_m and all(held_m):
        lines.append("The expected ordering held at an equal count of impressions, not on the final cumulative "
                     "numbers: the learners that fell behind had not reached the later part of the stream.")
    else:
        lines.append("The expected ordering did not fully hold in this run; the tables report what happened.")
    lines.append("")
    if s["drifts"]:
        lines += [f"Drift points (red dotted lines): {', '.join(f'{d:.0f} s' for d in s['drifts'])} after the "
                  "stream started.", ""]
    bad = s.get("invalid_auc_samples") or {}
    if bad:
        lines += ["**Data warning:** some scrapes returned an AUC outside [0, 1], which no AUC can be ("
                  + "; ".join(f"{p}: {len(v)} sample(s), e.g. {v[0]:.4f}" for p, v in bad.items())
                  + "). They are left out of the plots. A scrape reads the learner's metrics from the HTTP thread "
                    "while the learner thread updates them, so a snapshot can mix two states; the final numbers "
                    "above come from the last scrape and may carry the same error.", ""]
    lines += ["![prequential AUC](auc.png)", "", "![throughput](throughput.png)", ""]
    f = s["freshness"]
    lines += ["## Index freshness", ""]
    fd = s.get("freshness_deltas") or {}
    if fd.get("available"):
        def fresh_line(d: dict[str, Any]) -> str:
            within = d.get("within_budget")
            return (f"{d['items']:.0f} items, p50 {_n(d.get('p50_s'), '.2f')} s, p90 {_n(d.get('p90_s'), '.2f')} s, "
                    f"p99 {_n(d.get('p99_s'), '.2f')} s, mean {_n(d.get('mean_s'), '.2f')} s"
                    + (f", {within:.1%} within the {fd['budget_s']:g} s budget" if within is not None else ""))
        lines += ["**Item deltas**: the producer announces each new item on the items topic and the scorer applies "
                  "it to the served version between rebuilds (embedded with that version's frozen item tower). "
                  "From the item event to the moment the scorer serves it (the `towerstream_item_freshness_seconds` "
                  f"histogram, quantiles read as the dashboard reads them; {fd['refused']:.0f} deltas refused):", ""]
        st = fd.get("steady") or {}
        if st.get("items"):
            lines.append(f"- once the scorer served an index ({_n(st.get('from_s'), '.0f')} s after the start): "
                         + fresh_line(st))
        lines += ["- every new item, those announced before any index existed included: " + fresh_line(fd), ""]
    else:
        lines += [f"Item deltas: not measured ({fd.get('reason', 'no scorer metrics')}).", ""]
    lines += ["**Full rebuilds** (what freshness would be without deltas):", ""]
    if f.get("available"):
        lines.append(f"{f['new_items']} new items appeared in the stream; {f['indexed']} reached a published index "
                     f"version before the run ended ({f['not_indexed']} did not).")
        if f.get("indexed"):
            lines.append(f"From an item's first impression to the first published version holding it, all new items: "
                         f"median {_n(f.get('median_s'), '.1f')} s, p90 {_n(f.get('p90_s'), '.1f')} s, max "
                         f"{_n(f.get('max_s'), '.1f')} s. The first version was published "
                         f"{_n(f.get('first_version_s'), '.0f')} s after the stream started; items first shown "
                         f"after it ({_n(f.get('after_first_version'), '.0f')}, {_n(f.get('steady_indexed'), '.0f')} "
                         f"of them indexed in time): median {_n(f.get('steady_median_s'), '.1f')} s, p90 "
                         f"{_n(f.get('steady_p90_s'), '.1f')} s, max {_n(f.get('steady_max_s'), '.1f')} s "
                         f"(index period {cfg.get('index_period_s', 10):g} s, learner checkpoints every "
                         f"{cfg.get('checkpoint_every_s', 2):g} s).")
        lines += ["", "![freshness](freshness.png)", ""]
    else:
        lines += [f"Not measured: {f.get('reason')}.", "", "![freshness](freshness.png)", ""]
    ix = s["index"]
    lines += ["## Index", "",
              f"{ix['versions_published']} versions published from the {ix['learner']} checkpoint "
              f"(guardrail refusals {_n(ix['refused'], '.0f')}, failed builds {_n(ix['failed'], '.0f')}); "
              f"{_n(ix['items'], ',.0f')} items in the last one, recall@K {_n(ix['recall'], '.3f')} against exact "
              "search.", "", "![index versions](index_versions.png)", ""]
    rt = s.get("retrieval") or {}
    lines += ["## Retrieval", ""]
    if rt.get("metrics"):
        ks = sorted({int(key.split("@")[1]) for m in rt["metrics"].values() for key in m})
        searches = [x for x in RETRIEVAL_SEARCHES if x in rt["metrics"]]
        lines += [f"Index version {_n(rt.get('version'), '.0f')} (the last one with held-out clicks to measure on) "
                  f"on the indexer's held-out clicks ({_n(rt['users'], ',.0f')} users "
                  "with a click the checkpoint had not learned; each user's clicked items are its relevant set): "
                  "the served index, exact inner-product search over the same vectors, and the items most clicked "
                  "in what the checkpoint learned of the window.", "",
                  "| search | " + " | ".join(f"{m}@{k}" for m in ("recall", "hr", "ndcg") for k in ks) + " |",
                  "|---|" + "---:|" * (3 * len(ks))]
        for search in searches:
            m = rt["metrics"][search]
            lines.append(f"| {search} | " + " | ".join(_n(m.get(f"{mm}@{k}"), ".3f")
                                                     for mm in ("recall", "hr", "ndcg") for k in ks) + " |")
        over = rt.get("over_run") or {}
        if over.get("versions", 0) > 1:
            lines += ["", f"Over the run: the mean of the {over['versions']} measured versions, each weighted by its "
                      f"users ({_n(over['users'], ',.0f')} user-versions in all):", "",
                      "| search | " + " | ".join(f"{m}@{k}" for m in ("recall", "hr", "ndcg") for k in ks) + " |",
                      "|---|" + "---:|" * (3 * len(ks))]
            for search in searches:
                m = over["metrics"].get(search, {})
                lines.append(f"| {search} | " + " | ".join(_n(m.get(f"{mm}@{k}"), ".3f")
                                                         for mm in ("recall", "hr", "ndcg") for k in ks) + " |")
        lines += ["", "![retrieval](retrieval.png)", ""]
    else:
        lines += ["Not measured: the indexer exported no retrieval gauges (no version published, or no held-out "
                  "click in its window).", "", "![retrieval](retrieval.png)", ""]
    sc = s["scorer"]
    lines += ["## Scorer", ""]
    if sc["started"]:
        if sc["online_auc"] is not None:
            online = f"Online AUC of the served scores (joined with impressions and clicks): {_n(sc['online_auc'])}."
        else:
            online = (f"No online AUC: none of the {_n(sc['not_served'], ',.0f')} impressions showed a ranking the "
                      "scorer served (the simulator draws its own slates; it does not read the rankings topic).")
        outcomes = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(sc["requests"].items())) or "none"
        if not sc["requests"] and s["mode"] == "replay":
            outcomes += " (a MovieLens replay carries no request events: nothing came for the scorer to answer)"
        lines += [f"Requests by source and outcome: {outcomes}. Latency per request (total stage, from the "
                  f"histogram at the end, {_n(sc['observations'], ',.0f')} requests; each request observes the time "
                  f"of the batch it was scored in): p50 {'> ' if sc['p50_beyond_buckets'] else ''}"
                  f"{_n(sc['p50_ms'], '.2f')} ms, **p99 {'> ' if sc['p99_beyond_buckets'] else ''}"
                  f"{_n(sc['p99_ms'], '.2f')} ms**. {online}",
                  "", "![scorer latency](latency.png)", ""]
        steady = sc.get("steady") or {}
        if steady.get("stages"):
            a, b = steady["window_s"]
            lines += [f"Latency by stage in steady state (stream seconds {a:.0f}-{b:.0f}: from 10 s after the first "
                      "answer; `fetch`, `queue` and `end_to_end` run from the request record's Kafka timestamp, "
                      "the others are the scorer's own stages):", "",
                      "| stage | requests | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
            for stage, q in steady["stages"].items():
                lines.append(f"| {stage} | {q['requests']:,.0f} | {_n(q['p50_ms'], '.1f')} | {_n(q['p90_ms'], '.1f')} "
                             f"| {_n(q['p99_ms'], '.1f')} |")
            lines.append("")
    else:
        lines += ["The scorer did not start: no index version was published before the run ended.", "",
                  "![scorer latency](latency.png)", ""]
    cpu = s.get("cpu") or {}
    if cpu.get("seconds"):
        lines += ["## CPU", "", "CPU seconds (user + system) of each process over the run, start-up included, and per "
                  "1,000 events produced: what the pipeline costs, whatever else the machine was running.", "",
                  "| process | CPU s | CPU s per 1,000 events |", "|---|---:|---:|"]
        for name, v in sorted(cpu["seconds"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {v:.1f} | {_n(cpu['per_1000_events_s'].get(name), '.3f')} |")
        lines += [f"| all | {cpu['total_s']:.1f} | {_n(cpu.get('total_per_1000_events_s'), '.3f')} |", ""]
        st = cpu.get("steady")
        if st:
            per = st["total_per_1000_events_s"]
            lines += [f"While the stream flowed ({st['seconds']:.0f} s, {st['events']:,.0f} events, "
                      f"{st['events_per_s']:,.0f} events/s; start-up and shutdown left out) the processes used "
                      f"{st['cores_used']:.2f} cores, {per:.3f} CPU s per 1,000 events "
                      + ", ".join(f"{n} {v:.3f}" for n, v in sorted(st["per_1000_events_s"].items(),
                                                                      key=lambda kv: -kv[1]))
                      + f". At that cost, {machine.get('cores', 2)} idle cores carry about "
                      f"{1000.0 * (machine.get('cores') or 2) / per:,.0f} events/s.", ""]
    lines += ["## Files", "",
              "`timeseries.jsonl` (every scrape), `truth.jsonl` (simulator ground truth), `index_versions.jsonl`, "
              "`index_items.json`, `summary.json`, `logs/` (one per process), `pids.json`, `demo.json`.", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Write ``report.md``, the PNGs and ``summary.json`` into ``run_dir``; returns the report's path."""
    run = load_run(Path(run_dir))
    s = summarize(run)
    fresh = freshness(run)
    plot_auc(run, run.path / "auc.png")
    plot_throughput(run, run.path / "throughput.png")
    plot_freshness(run, fresh, run.path / "freshness.png")
    plot_latency(run, run.path / "latency.png")
    plot_index_versions(run, run.path / "index_versions.png")
    plot_retrieval(run, run.path / "retrieval.png")
    (run.path / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    path = run.path / "report.md"
    path.write_text(_markdown(run, s))
    return path
