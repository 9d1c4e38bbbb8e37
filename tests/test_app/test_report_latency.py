"""app.report.latency_stages: steady-state latency by stage from cumulative scrapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.report import RunData, latency_stages


def _scrape(t: float, counts: dict[str, list[float]]) -> dict:
    """A scorer scrape at wall time ``t``: cumulative counts per stage over buckets 1/10/100 ms, +Inf."""
    m: dict[str, float] = {}
    for stage, cum in counts.items():
        for le, c in zip(("0.001", "0.01", "0.1", "+Inf"), cum):
            m[f'towerstream_score_latency_seconds_bucket{{le="{le}",stage="{stage}"}}'] = c
    return {"t": t, "metrics": {"scorer": m}}


def test_steady_window_leaves_out_the_start_up_backlog() -> None:
    samples = [
        _scrape(100.0, {"total": [0, 0, 0, 0], "queue": [0, 0, 0, 0]}),
        # the first answers: 50 requests held at start-up, each queued > 100 ms
        _scrape(102.0, {"total": [0, 50, 50, 50], "queue": [0, 0, 0, 50]}),
        _scrape(113.0, {"total": [0, 60, 60, 60], "queue": [0, 10, 10, 60]}),  # window start (>= 102 + 10)
        # steady state: 100 more requests, 90 queued under 10 ms and 10 between 10 and 100 ms
        _scrape(140.0, {"total": [0, 160, 160, 160], "queue": [0, 100, 110, 160]}),
    ]
    run = RunData(path=Path("."), demo={"started_at": 100.0}, samples=samples)
    out = latency_stages(run, warmup_s=10.0)
    assert out["window_s"] == [13.0, 40.0]
    q = out["stages"]["queue"]
    assert q["requests"] == 100
    # rank 50 of 100 lies in the (1 ms, 10 ms] bucket, 50/90 of the way: 1 + 9 * 50/90 ms
    assert q["p50_ms"] == pytest.approx(1 + 9 * 50 / 90)
    # rank 99: the (10, 100] bucket holds ranks 91-100, so 10 + 90 * 9/10 ms
    assert q["p99_ms"] == pytest.approx(10 + 90 * 9 / 10)
    assert "end_to_end" not in out["stages"]  # a stage with no observation is left out


def test_no_window_before_the_scorer_answered() -> None:
    samples = [_scrape(100.0, {"total": [0, 0, 0, 0]}), _scrape(200.0, {"total": [0, 0, 0, 0]})]
    assert latency_stages(RunData(path=Path("."), demo={}, samples=samples)) == {}
