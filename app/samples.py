"""What the demo and its report share: the learners a run shows and how a ``/metrics`` scrape
is read (sample keys, histogram quantiles, lag) and where it ran (machine info).

:mod:`app.demo` writes scrapes with these keys and :mod:`app.report` reads them back; both
import this module and neither imports the other's internals.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = ["LEARNERS", "sample_key", "parse_metrics", "histogram_quantile", "latency_buckets",
           "machine_info", "consumer_lag"]

LEARNERS: tuple[str, ...] = ("ctr", "lr", "two-tower", "inttower")


def sample_key(name: str, labels: dict[str, str]) -> str:
    """One sample's key in ``timeseries.jsonl``: Prometheus text syntax, labels sorted.

    >>> sample_key("towerstream_prequential_auc", {"window": "all", "learner": "lr"})
    'towerstream_prequential_auc{learner="lr",window="all"}'
    >>> sample_key("towerstream_index_version", {})
    'towerstream_index_version'
    """
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


def parse_metrics(text: str, prefix: str = "towerstream_") -> dict[str, float]:
    """Flatten a ``/metrics`` page into ``{sample_key: value}`` (samples named ``prefix*`` only).

    >>> parse_metrics('# TYPE towerstream_x_total counter\\ntowerstream_x_total{a="1"} 3.0\\npython_y 1\\n')
    {'towerstream_x_total{a="1"}': 3.0}
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix) and not s.name.endswith("_created"):
                out[sample_key(s.name, dict(s.labels))] = float(s.value)
    return out


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile`` over cumulative ``(upper_bound, count)`` pairs.

    Linear interpolation inside the bucket that holds the quantile; NaN without
    observations; the largest finite bound when the quantile falls in ``+Inf``.

    >>> histogram_quantile(0.5, [(0.001, 0), (0.002, 10), (float("inf"), 10)])
    0.0015
    """
    pts = sorted(buckets)
    if not pts or pts[-1][1] <= 0:
        return math.nan
    rank = q * pts[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in pts:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return pts[-1][0]


def histogram_buckets(metrics: dict[str, float], name: str, label: str = "") -> list[tuple[float, float]]:
    """``(upper_bound, cumulative count)`` of histogram ``name`` in a scrape, sorted; only
    the samples whose key holds ``label`` (e.g. ``'stage="total"'``) when given."""
    out = []
    head = f"{name}_bucket{{"
    for k, v in metrics.items():
        if k.startswith(head) and label in k:
            le = k.split('le="', 1)[1].split('"', 1)[0]
            out.append((float(le), v))
    return sorted(out)


def latency_buckets(metrics: dict[str, float], stage: str = "total") -> list[tuple[float, float]]:
    """``(upper_bound, cumulative count)`` of the scorer's latency histogram in a scrape."""
    return histogram_buckets(metrics, "towerstream_score_latency_seconds", f'stage="{stage}"')


def freshness_buckets(metrics: dict[str, float]) -> list[tuple[float, float]]:
    """``(upper_bound, cumulative count)`` of the scorer's item-freshness histogram in a scrape."""
    return histogram_buckets(metrics, "towerstream_item_freshness_seconds")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, and the versions that matter (for reports)."""
    import platform

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    from importlib import metadata

    for pkg in ("torch", "faiss-cpu", "numpy", "kafka-python", "confluent-kafka", "prometheus-client", "river"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info


def consumer_lag(metrics: dict[str, float]) -> float | None:
    """Consumer lag summed over topics in one scrape; None before it was measured."""
    vals = [v for k, v in metrics.items() if k.startswith("towerstream_consumer_lag_records")]
    return float(sum(vals)) if vals else None
