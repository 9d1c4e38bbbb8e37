"""The report's retrieval numbers from the indexer gauges in timeseries samples (no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.report import RunData, retrieval, retrieval_key


def _sample(t: float, version: int | None, users: float | None, recall_served: float) -> dict:
    m: dict[str, float] = {"towerstream_index_version": 1.0}
    if version is not None:
        m.update({"towerstream_index_retrieval_version": float(version), "towerstream_index_retrieval_users": users,
                  retrieval_key("recall", 50, "served"): recall_served,
                  retrieval_key("recall", 50, "popularity"): 0.5})
    return {"t": t, "metrics": {"indexer": m}}


def test_last_version_and_user_weighted_mean_over_versions() -> None:
    samples = [_sample(0, None, None, 0.0),
               _sample(1, 1, 10, 0.9),   # version 1, superseded by its later scrape
               _sample(2, 1, 10, 0.2),
               _sample(3, 2, 30, 0.6)]
    run = RunData(path=Path("."), demo={"started_at": 0}, samples=samples)
    rt = retrieval(run)
    assert rt["version"] == 2 and rt["users"] == 30
    assert rt["metrics"]["served"]["recall@50"] == 0.6
    over = rt["over_run"]
    assert over["versions"] == 2 and over["users"] == 40
    assert over["metrics"]["served"]["recall@50"] == pytest.approx((10 * 0.2 + 30 * 0.6) / 40)
    assert over["metrics"]["popularity"]["recall@50"] == pytest.approx(0.5)


def test_no_gauges_means_nothing_measured() -> None:
    rt = retrieval(RunData(path=Path("."), demo={}, samples=[_sample(0, None, None, 0.0)]))
    assert rt["metrics"] == {} and rt["over_run"]["versions"] == 0
