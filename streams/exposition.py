"""Prometheus plumbing every towerstream process shares, at the bottom of the stack.

The metric-name prefix, a version as a gauge value, the ``/metrics`` + ``/healthz`` +
``/readyz`` server of processes without the scorer's HTTP surface (learners, the indexer),
and helpers that collectors use. Each layer defines its own metrics on top of this module
(:mod:`learners.prometheus`, :mod:`indexer.prometheus`, :mod:`serving.metrics`), so nothing
imports a layer above it to export a gauge.

>>> version_number("v000042")
42.0
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["PREFIX", "version_number", "number", "read_source", "MetricsHTTPServer", "start_metrics_server",
           "metric_names", "ThreadCPUCollector", "thread_schedstats", "watch_gc_pauses"]

logger = logging.getLogger(__name__)

PREFIX = "towerstream"
"""Every metric name starts with ``towerstream_``."""


def version_number(version: Any) -> float:
    """A version as a number for a gauge: ints as is, else the last run of digits.

    >>> version_number(12), version_number("v000042"), version_number("20240101T1200-7")
    (12.0, 42.0, 7.0)
    >>> version_number(None)
    nan
    """
    if isinstance(version, bool) or version is None:
        return float("nan")
    if isinstance(version, (int, float)):
        return float(version)
    digits = re.findall(r"\d+", str(version))
    return float(digits[-1]) if digits else float("nan")



def number(value: Any) -> float | None:
    """A finite-or-NaN float, or None for missing/non-numeric values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_source(source: Any, method: str) -> Any:
    """``source.<method>()`` if it has that method, else ``source()`` if it is a plain
    function, else ``source`` itself (already a snapshot)."""
    fn = getattr(source, method, None)
    if callable(fn):
        return fn()
    if inspect.isroutine(source) or isinstance(source, functools.partial):
        return source()
    return source


class _MetricsHandler(BaseHTTPRequestHandler):
    server: "MetricsHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"alive\n")
        elif path == "/readyz":
            try:
                ready, reason = self.server.ready()
            except Exception as exc:  # a probe must answer, whatever the check did
                ready, reason = False, f"readiness check failed: {type(exc).__name__}: {exc}"
            self._send(200 if ready else 503, f"{reason}\n".encode())
        else:
            self._send(404, b"try /metrics, /healthz or /readyz\n")


class MetricsHTTPServer(ThreadingHTTPServer):
    """``/metrics``, ``/healthz`` and ``/readyz`` for processes without the scorer's HTTP
    server (learners, the indexer)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 ready: Callable[[], tuple[bool, str]]) -> None:
        super().__init__(address, _MetricsHandler)
        self.registry = registry
        self.ready = ready

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def start_metrics_server(
    port: int,
    registry: CollectorRegistry = REGISTRY,
    addr: str = "0.0.0.0",
    *,
    ready: Callable[[], tuple[bool, str]] | None = None,
) -> MetricsHTTPServer:
    """Serve ``/metrics`` of ``registry`` (plus ``/healthz`` and ``/readyz``) from a daemon thread.

    Parameters
    ----------
    port
        TCP port; ``0`` picks a free one (``server.port``).
    registry
        What ``/metrics`` exposes.
    addr
        Bind address.
    ready
        ``() -> (ready, reason)`` for ``/readyz`` (200 or 503 with the reason), e.g. "a
        checkpoint was loaded" for a learner or "a version is published" for the indexer;
        None: always ready.

    Stop it with ``server.shutdown()``.
    """
    server = MetricsHTTPServer((addr, port), registry, ready or (lambda: (True, "ok")))
    threading.Thread(target=server.serve_forever, args=(0.1,), name="metrics-http", daemon=True).start()
    logger.info("serving /metrics /healthz /readyz on %s:%d", addr, server.port)
    return server



def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` exposes (``_total``, ``_bucket``, ``_info`` ... included)."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update(f"{family.name}{s}" for s in ("_sum", "_count"))
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "info":
            names.add(f"{family.name}_info")
    return names



def thread_schedstats(task_dir: Path = Path("/proc/self/task")) -> dict[str, tuple[float, float]]:
    """CPU time and run-queue wait, in seconds, per Python thread name of this process.

    From Linux's ``/proc/self/task/<tid>/schedstat`` (time on a CPU, time runnable but
    waiting for one). Threads that Python does not know (native library threads) are summed
    under ``other``; threads of one name are summed. Empty where ``/proc`` has no schedstat.

    >>> stats = thread_schedstats()
    >>> all(cpu >= 0 and wait >= 0 for cpu, wait in stats.values())
    True
    """
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, tuple[float, float]] = {}
    try:
        tids = [int(t) for t in os.listdir(task_dir)]
    except OSError:
        return out
    for tid in tids:
        try:
            run_ns, wait_ns = (int(v) for v in (task_dir / str(tid) / "schedstat").read_text().split()[:2])
        except (OSError, ValueError):  # the thread ended between listdir and read, or no schedstat
            continue
        name = names.get(tid, "other")
        cpu, wait = out.get(name, (0.0, 0.0))
        out[name] = (cpu + run_ns / 1e9, wait + wait_ns / 1e9)
    return out


class ThreadCPUCollector(Collector):
    """``towerstream_thread_cpu_seconds_total{thread}`` and
    ``towerstream_thread_runqueue_wait_seconds_total{thread}``, read at scrape time.

    Where a latency goes inside a process: a thread that burns CPU beside the request loop
    (it holds the GIL while it runs Python), or a process starved of CPU by its neighbours
    (run-queue wait grows while the thread is runnable but not running).
    """

    def __init__(self, read: Callable[[], dict[str, tuple[float, float]]] = thread_schedstats) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(f"{PREFIX}_thread_cpu_seconds", "CPU time of this process's threads.",
                                  labels=["thread"])
        wait = CounterMetricFamily(f"{PREFIX}_thread_runqueue_wait_seconds",
                                   "Time this process's threads were runnable but waited for a CPU.",
                                   labels=["thread"])
        for name, (c, w) in sorted(self.read().items()):
            cpu.add_metric([name], c)
            wait.add_metric([name], w)
        yield from (cpu, wait)


GC_BUCKETS: tuple[float, ...] = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def watch_gc_pauses(registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Observe every pause of Python's cyclic garbage collector in
    ``towerstream_gc_pause_seconds{generation}``: the whole process stops for it, so in a
    request loop each pause is latency. Returns a function that stops watching.

    >>> from prometheus_client import CollectorRegistry
    >>> reg = CollectorRegistry()
    >>> stop = watch_gc_pauses(reg)
    >>> _ = gc.collect(2)
    >>> reg.get_sample_value("towerstream_gc_pause_seconds_count", {"generation": "2"}) >= 1
    True
    >>> stop()
    """
    from prometheus_client import Histogram

    hist = Histogram(f"{PREFIX}_gc_pause_seconds", "Pauses of the cyclic garbage collector.", ["generation"],
                     buckets=GC_BUCKETS, registry=registry)
    children = [hist.labels(generation=str(g)) for g in range(3)]
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            children[min(info.get("generation", 2), 2)].observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)

    def stop() -> None:  # the histogram stays registered with what it observed
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)

    return stop
