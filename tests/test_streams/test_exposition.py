"""streams.exposition: the per-thread CPU / run-queue collector on real /proc data and a fake."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from streams.exposition import ThreadCPUCollector, thread_schedstats


def test_collector_exports_each_thread_with_its_cpu_and_wait() -> None:
    reg = CollectorRegistry()
    reg.register(ThreadCPUCollector(lambda: {"request-loop": (1.5, 0.25), "events-follower": (3.0, 0.5)}))
    get = reg.get_sample_value
    assert get("towerstream_thread_cpu_seconds_total", {"thread": "request-loop"}) == 1.5
    assert get("towerstream_thread_runqueue_wait_seconds_total", {"thread": "request-loop"}) == 0.25
    assert get("towerstream_thread_cpu_seconds_total", {"thread": "events-follower"}) == 3.0


def test_a_busy_named_thread_shows_its_cpu_time() -> None:
    done = threading.Event()

    def spin() -> None:
        x = 0
        while not done.is_set():
            x += 1

    t = threading.Thread(target=spin, name="spinner", daemon=True)
    t.start()
    try:
        before = thread_schedstats().get("spinner", (0.0, 0.0))[0]
        done.wait(0.3)
        after = thread_schedstats()["spinner"][0]
    finally:
        done.set()
        t.join()
    assert after > before  # the kernel's schedstat counted the thread under its Python name
    assert "MainThread" in thread_schedstats()
