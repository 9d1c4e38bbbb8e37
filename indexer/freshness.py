"""The freshness SLO of item deltas, as Prometheus metrics.

``towerstream_item_freshness_seconds`` is a histogram from an item event's time to the
moment its delta handle was built (its first retrievable moment once swapped in), with
bucket edges around the budget (default 2 s) so ``histogram_quantile`` reads p50, p90
and p99 and the alert in ``deploy/prometheus/rules/freshness.yml`` fires when p90
exceeds the budget. ``towerstream_index_delta_refused_total`` counts refused deltas
(non-finite vectors) and ``towerstream_index_delta_seq`` the item-log sequence served.

>>> from prometheus_client import CollectorRegistry
>>> reg = CollectorRegistry()
>>> m = FreshnessMetrics(reg)
>>> m.observe("i1", 0.4); m.refused(); m.served(7)
>>> reg.get_sample_value("towerstream_item_freshness_seconds_count"), reg.get_sample_value("towerstream_index_delta_seq")
(1.0, 7.0)
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from streams.exposition import PREFIX

__all__ = ["FreshnessMetrics", "FRESHNESS_BUDGET_S", "FRESHNESS_BUCKETS"]

FRESHNESS_BUDGET_S = 2.0
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)


class FreshnessMetrics:
    """Freshness histogram, refused-delta counter and served delta sequence.

    Parameters
    ----------
    registry
        Where to register (the process registry by default).
    budget_s
        The freshness budget, exported as ``towerstream_item_freshness_budget_seconds``.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY, budget_s: float = FRESHNESS_BUDGET_S) -> None:
        self.histogram = Histogram(f"{PREFIX}_item_freshness_seconds",
                                   "Item event time -> first retrievable moment (delta applied).",
                                   buckets=FRESHNESS_BUCKETS, registry=registry)
        self.refused_total = Counter(f"{PREFIX}_index_delta_refused",
                                     "Item deltas refused (non-finite vector): never served.", registry=registry)
        self.delta_seq = Gauge(f"{PREFIX}_index_delta_seq", "Item-log sequence applied on the served version.",
                               registry=registry)
        budget = Gauge(f"{PREFIX}_item_freshness_budget_seconds", "The freshness SLO budget.", registry=registry)
        budget.set(budget_s)

    def observe(self, item_id: str, seconds: float) -> None:
        """One item became retrievable ``seconds`` after its event (``DeltaLog(on_fresh=...)``)."""
        self.histogram.observe(max(seconds, 0.0))

    def refused(self) -> None:
        """Count one refused delta."""
        self.refused_total.inc()

    def served(self, delta_seq: int) -> None:
        """The served handle now reflects the item log up to ``delta_seq``."""
        self.delta_seq.set(delta_seq)
