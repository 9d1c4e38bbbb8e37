"""``towerstream demo`` end to end: a real broker, every process, the report, and nothing left behind.

Each test runs the real command in a subprocess with its own local Kafka broker (so the
port check covers the broker too), then reads what the run directory says: the report
and its plots, the scrapes in ``timeseries.jsonl``, and ``pids.json`` (every child pid
and every port the demo used), and checks that no child survived and no port still
listens. The second test stops a demo with SIGINT while it runs, the third SIGKILLs one.

Unit tests of the pure helpers (metrics parsing, histogram quantiles, the ordering
check) sit at the end and need no broker.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.samples import histogram_quantile, parse_metrics, sample_key
from app.report import ordering

REPO = Path(__file__).resolve().parents[2]
LEARNERS = ("ctr", "lr", "two-tower", "inttower")
PLOTS = ("auc.png", "throughput.png", "freshness.png", "latency.png", "index_versions.png")


def _demo_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)  # the demo must launch (and stop) its own broker
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0): it is dead for our purpose only if reaped by its parent
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _assert_nothing_left(run: Path) -> dict:
    pids = json.loads((run / "pids.json").read_text())
    children = {name: pid for name, pid in pids["children"].items() if pid}
    if pids.get("broker"):
        children["broker"] = pids["broker"]
    assert set(LEARNERS) <= set(children), f"learners missing from pids.json: {children}"
    assert "broker" in children, "the demo should have launched its own broker"
    alive = {name: pid for name, pid in children.items() if _alive(pid)}
    assert not alive, f"still running after the demo exited: {alive}"
    ports = pids["ports"]
    assert {"broker", *LEARNERS} <= set(ports), f"ports missing from pids.json: {ports}"
    listening = {name: p for name, p in ports.items() if _listening(p)}
    assert not listening, f"still listening after the demo exited: {listening}"
    return pids


def _timeseries(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "timeseries.jsonl").read_text().splitlines() if line.strip()]


def _auc_samples(rows: list[dict], learner: str) -> list[float]:
    key = sample_key("towerstream_prequential_auc", {"learner": learner, "window": "all"})
    return [r["metrics"][learner][key] for r in rows if key in r["metrics"].get(learner, {})]


@pytest.mark.kafka
@pytest.mark.slow
def test_demo_runs_reports_and_leaves_nothing_running(tmp_path, local_broker_config):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--duration", "40", "--rate", "500", "--out", str(run)],
        cwd=REPO, env=_demo_env(), capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stderr[-4000:]}"

    report = run / "report.md"
    assert report.is_file() and report.stat().st_size > 0
    text = report.read_text()
    for name in PLOTS:
        png = run / name
        assert png.is_file() and png.stat().st_size > 1000, f"{name} missing or empty"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        assert f"({name})" in text, f"the report does not show {name}"

    rows = _timeseries(run)
    assert len(rows) >= 5, "the demo should have scraped every couple of seconds"
    for learner in LEARNERS:
        aucs = _auc_samples(rows, learner)
        assert aucs, f"no prequential AUC sample of {learner} in timeseries.jsonl"
        assert all(0.0 <= a <= 1.0 for a in aucs)
        assert learner in text

    summary = json.loads((run / "summary.json").read_text())
    assert summary["produced_events"] and summary["produced_events"] > 0
    assert [o["claim"] for o in summary["ordering"]] == ["two-tower > lr", "lr > ctr", "inttower >= two-tower"]
    truth = [json.loads(line) for line in (run / "truth.jsonl").read_text().splitlines()]
    assert any(r["type"] == "drift" for r in truth), "a 40 s run at 500/s should pass a drift point"
    # New items reach the scorer as item events and are served as deltas, each counted once.
    new_items = sum(r["type"] == "new_item" for r in truth)
    fd = summary["freshness_deltas"]
    assert new_items > 0 and fd["available"], fd
    assert 0 < fd["items"] <= fd["delta_seq"] and fd["refused"] == 0  # delta_seq: item events on the topic
    assert "**Item deltas**" in text
    _assert_nothing_left(run)


def _start_long_demo(run: Path) -> subprocess.Popen:
    """A 300 s demo in a subprocess, returned once its producer runs (every learner answers)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "demo", "--duration", "300", "--rate", "500", "--out", str(run),
         "--no-report"],
        cwd=REPO, env=_demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            pids_file = run / "pids.json"
            if pids_file.is_file() and "producer" in json.loads(pids_file.read_text())["children"]:
                return proc
            assert proc.poll() is None, f"demo exited early:\n{proc.stdout.read()[-4000:]}"
            time.sleep(0.5)
        pytest.fail("the demo did not start its producer within 240 s")
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.mark.kafka
@pytest.mark.slow
def test_demo_stops_cleanly_on_sigint(tmp_path, local_broker_config):
    run = tmp_path / "run"
    proc = _start_long_demo(run)
    try:
        time.sleep(5)  # interrupt while everything runs
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"demo did not stop cleanly ({proc.returncode}):\n{out[-4000:]}"
    assert "SIGINT" in json.loads((run / "demo.json").read_text())["stop_reason"]
    assert not (run / "report.md").exists()  # --no-report
    _assert_nothing_left(run)


@pytest.mark.kafka
@pytest.mark.slow
def test_a_sigkilled_demo_leaves_nothing_running(tmp_path, local_broker_config):
    """SIGKILL gives the demo no chance to clean up: the kernel must stop its children and
    its broker (``PR_SET_PDEATHSIG``), which then shut down by themselves."""
    run = tmp_path / "run"
    proc = _start_long_demo(run)
    try:
        time.sleep(3)
        pids = json.loads((run / "pids.json").read_text())
        assert pids.get("broker") and _alive(pids["broker"]), "the broker should be running before the kill"
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the children get SIGTERM from the kernel and stop on their own (a learner finishes its
    # batch and checkpoints, or exits 30 s later if the gone broker blocks its final commit;
    # the broker shuts down): give them time, then check
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        everyone = {**pids["children"], "broker": pids["broker"]}
        if not any(pid and _alive(pid) for pid in everyone.values()):
            break
        time.sleep(1)
    _assert_nothing_left(run)


# --------------------------------------------------------------------------- helpers (no broker)


def test_parse_metrics_keeps_towerstream_samples_with_sorted_labels():
    text = (
        "# HELP towerstream_prequential_auc AUC.\n# TYPE towerstream_prequential_auc gauge\n"
        'towerstream_prequential_auc{window="all",learner="lr"} 0.75\n'
        "# HELP process_cpu_seconds_total CPU.\n# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 3.0\n"
    )
    assert parse_metrics(text) == {'towerstream_prequential_auc{learner="lr",window="all"}': 0.75}


def test_histogram_quantile_interpolates_inside_the_bucket():
    buckets = [(0.001, 50.0), (0.002, 90.0), (0.005, 100.0), (math.inf, 100.0)]
    # rank 99 of 100 lies in (0.002, 0.005], 9 of its 10 observations in
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.002 + 0.003 * 0.9)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert math.isnan(histogram_quantile(0.99, [(0.001, 0.0), (math.inf, 0.0)]))
    # beyond the last finite bound: the bound itself, as Prometheus does
    assert histogram_quantile(0.99, [(0.001, 1.0), (math.inf, 10.0)]) == 0.001


def test_ordering_reports_each_claim_as_it_came_out():
    learners = {"ctr": {"auc": 0.60}, "lr": {"auc": 0.75}, "two-tower": {"auc": 0.74}, "inttower": {"auc": 0.74}}
    got = {o["claim"]: o["held"] for o in ordering(learners)}
    assert got == {"two-tower > lr": False, "lr > ctr": True, "inttower >= two-tower": True}
    missing = ordering({"ctr": {"auc": 0.6}, "lr": {"auc": None}})
    assert missing == [{"claim": "lr > ctr", "left": None, "right": 0.6, "held": None}]


def test_bench_discovers_scripts_and_renders_each_output(tmp_path):
    import datetime as dt

    from app.bench import BenchResult, discover, render_markdown

    for name in ("bench_a.py", "bench_b.py", "_helper.py", "notes.txt"):
        (tmp_path / name).write_text("print('x')\n")
    assert [p.name for p in discover(tmp_path)] == ["bench_a.py", "bench_b.py"]
    assert [p.name for p in discover(tmp_path, only=["b"])] == ["bench_b.py"]
    with pytest.raises(Exception, match="no benchmark named zzz"):
        discover(tmp_path, only=["zzz"])
    results = [BenchResult("bench_a", ("python", "bench_a.py"), 0, 1.5, "rate 123 events/s\n"),
               BenchResult("bench_b", ("python", "bench_b.py", "--runs", "1"), 3, 2.0, "Traceback: boom\n")]
    md = render_markdown(results, {"cpu": "Test CPU", "cores": 2, "torch": "9.9"}, dt.datetime(2026, 1, 2), True)
    assert "| CPU | Test CPU |" in md and "| torch | 9.9 |" in md and "2026-01-02" in md
    assert "rate 123 events/s" in md and "Traceback: boom" in md
    assert "| bench_b | 3 |" in md


def _ml100k_slice(src: Path, dest: Path, n: int) -> tuple[int, int, int]:
    """The ``n`` earliest ratings of ml-100k with its user and item files; returns
    (impressions, clicks, requests) the replay should send, counted here from the lines."""
    dest.mkdir()
    for name in ("u.user", "u.item"):
        (dest / name).write_bytes((src / name).read_bytes())
    rows = [line.split("\t") for line in (src / "u.data").read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: int(r[3]))
    rows = rows[:n]
    (dest / "u.data").write_text("".join("\t".join(r) + "\n" for r in rows))
    clicks = sum(int(r[2]) >= 4 for r in rows)
    requests = len({(r[0], r[3]) for r in rows})
    return len(rows), clicks, requests


@pytest.mark.kafka
@pytest.mark.slow
def test_a_movielens_replay_runs_every_process_and_ends_committed_and_indexed(tmp_path, local_broker_config,
                                                                            movielens_path):
    from learners.checkpoint import load_checkpoint

    impressions, clicks, requests = _ml100k_slice(movielens_path, tmp_path / "ml-slice", 4000)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--replay", str(tmp_path / "ml-slice"), "--duration", "120",
         "--rate", "400", "--out", str(run)],
        cwd=REPO, env=_demo_env(), capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "replay"
    assert summary["stop_reason"].startswith("the stream ended")  # the replay, not the clock, ended the run
    assert summary["produced_events"] == impressions + clicks + requests

    # Every learner checkpointed offsets covering the whole events topic (impressions and clicks).
    for learner in LEARNERS:
        ck = load_checkpoint(run / "ckpt" / f"{learner}.ckpt")
        events_topic = next(t for t in ck.offsets if t.endswith(".events"))
        assert sum(ck.offsets[events_topic].values()) == impressions + clicks, learner
    # An index version was published and the scorer answered requests.
    versions = [json.loads(line) for line in (run / "index_versions.jsonl").read_text().splitlines()]
    assert versions and (run / "index" / "CURRENT").exists()
    assert summary["scorer"]["answered_ok"] > 0

    # Freshness: every item's first rating is ground truth; the distinct items are counted here.
    distinct_items = len({line.split("\t")[1] for line in (tmp_path / "ml-slice" / "u.data").read_text().splitlines()})
    assert summary["freshness"]["available"] and summary["freshness"]["new_items"] == distinct_items
    assert summary["freshness"]["indexed"] > 0
    # each replayed item was announced as an item event before its first rating
    assert summary["freshness_deltas"]["available"]
    assert 0 < summary["freshness_deltas"]["items"] <= distinct_items

    text = (run / "report.md").read_text()
    assert "## Retrieval" in text and "(retrieval.png)" in text
    assert (run / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for learner in LEARNERS:
        assert summary["learners"][learner]["auc"] is not None and 0.0 <= summary["learners"][learner]["auc"] <= 1.0
    _assert_nothing_left(run)
