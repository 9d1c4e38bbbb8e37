"""Fixtures of the serving tests: a REAL Prometheus server, and small fakes.

``prometheus`` is a factory: ``prometheus({"scorer": ["127.0.0.1:8081"], ...})`` starts
``/usr/bin/prometheus`` (or ``$TOWERSTREAM_PROMETHEUS``) with a 1 s scrape interval on
those targets, waits for ``/-/ready`` and returns a :class:`PrometheusServer` with
``query(expr)`` and ``wait_for(expr, predicate)``. The server is stopped afterwards.
A missing binary skips the test, or fails it when ``TOWERSTREAM_REQUIRE_KAFKA=1`` (CI
installs Prometheus beside Kafka).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pytest
import yaml


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_binary() -> str | None:
    explicit = os.environ.get("TOWERSTREAM_PROMETHEUS")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body), HTTP errors included (no exception for 4xx/5xx)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class PrometheusServer:
    """A running Prometheus and its HTTP API."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """``/api/v1/query``: the result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        status, body = http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        obj = json.loads(body)
        if status != 200 or obj.get("status") != "success":
            raise AssertionError(f"Prometheus query {expr!r} failed ({status}): {obj}")
        return obj["data"]["result"]

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr)]

    def wait_for(self, expr: str, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30.0,
                 ) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``predicate(result)``; AssertionError with the last result on timeout."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"Prometheus: {expr!r} never satisfied the condition in {timeout_s}s; last: {result}; "
                             f"targets: {self.targets()}")

    def wait_values(self, expr: str, expected: list[float], timeout_s: float = 30.0) -> None:
        """Wait until ``expr`` returns exactly ``expected`` (sorted values): scrapes lag on a busy machine."""
        self.wait_for(expr, lambda r: sorted(float(x["value"][1]) for x in r) == sorted(expected), timeout_s)

    def targets(self) -> list[dict[str, Any]]:
        _, body = http_get(f"{self.url}/api/v1/targets")
        return [
            {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
            for t in json.loads(body).get("data", {}).get("activeTargets", [])
        ]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[Mapping[str, Sequence[str]]], PrometheusServer]]:
    """Factory: start a real Prometheus scraping ``{job: [host:port, ...]}`` every second."""
    binary = prometheus_binary()
    if binary is None:
        msg = "no prometheus binary (apt-get install prometheus, or set TOWERSTREAM_PROMETHEUS)"
        if os.environ.get("TOWERSTREAM_REQUIRE_KAFKA") == "1":
            pytest.fail(f"Prometheus required in CI (TOWERSTREAM_REQUIRE_KAFKA=1): {msg}", pytrace=False)
        pytest.skip(msg)
    started: list[subprocess.Popen] = []

    def start(jobs: Mapping[str, Sequence[str]]) -> PrometheusServer:
        root = tmp_path / f"prometheus{len(started)}"
        root.mkdir()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(targets)}]} for job, targets in jobs.items()
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log_path = root / "prometheus.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if http_get(f"{url}/-/ready", timeout=1.0)[0] == 200:
                    return PrometheusServer(url, proc, log_path)
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready within 60s: {log_path.read_text()[-2000:]}")

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- fakes


class FakeTwoTower:
    """A deterministic two-tower in D=4 for unit tests.

    User vector: one-hot on ``hash(user_id) % 4``. Item vectors are given. The pre-rank
    score of item ``iN`` is ``prerank[iN]`` (default: N / 1000), as a probability.
    ``calls`` records the calls, ``version`` tells handles apart.
    """

    def __init__(self, version: int = 0, prerank: Mapping[str, float] | None = None, dim: int = 4) -> None:
        self.version = version
        self.prerank = dict(prerank or {})
        self.dim = dim
        self.calls: list[tuple[str, int]] = []
        self.spec = {"name": "fake-two-tower", "params": {}}

    def user_vec(self, user_id: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        v[int(user_id.lstrip("u") or 0) % self.dim] = 1.0
        return v

    def encode_users(self, xs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        self.calls.append(("encode_users", len(xs)))
        return np.stack([self.user_vec(str(x["user_id"])) for x in xs]) if xs else np.zeros((0, self.dim), "float32")

    def score_candidates(self, user_x: Mapping[str, Any], item_xs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        self.calls.append(("score_candidates", len(item_xs)))
        return np.array([self._prerank(str(x["item_id"])) for x in item_xs])

    def _prerank(self, item_id: str) -> float:
        if item_id in self.prerank:
            return self.prerank[item_id]
        return int(item_id.lstrip("abcdefghijklmnopqrstuvwxyz") or 0) / 1000

    def predict_proba_many(self, xs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return np.array([self.prerank.get(x["item_id"], 0.5) for x in xs], dtype=np.float64)


def flat_handle(version: int, ids: Sequence[str], vecs: np.ndarray) -> Any:
    """A real in-memory :class:`indexer.handle.IndexHandle` (exact inner product)."""
    import faiss

    from indexer.handle import IndexHandle

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return IndexHandle(index=index, ids=np.array(list(ids)), version=version,
                       manifest={"published_at": time.time()})


@pytest.fixture
def fakes() -> Any:
    """The fakes above, for test modules (importlib mode: test modules cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(FakeTwoTower=FakeTwoTower, flat_handle=flat_handle, free_port=free_port,
                           http_get=http_get)


# --------------------------------------------------------------------------- real artifacts


@dataclass(frozen=True)
class Artifacts:
    """A briefly trained two-tower checkpoint and a published index built from it."""

    checkpoint: Path
    index_root: Path
    catalogue: Path
    sim_config: Any
    events_learned: int
    index_ids: frozenset[str]
    service: Any  # the IndexerService that built version 1 (its counters feed the exporter)


@pytest.fixture(scope="session")
def trained_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """Train a small two-tower on ~2,000 simulated impressions (a few seconds), checkpoint
    it, and build + publish index version 1 with the real indexer service."""
    import orjson

    from indexer import ArtifactStore, Catalogue, FileCheckpointSource, IndexerService
    from learners.base import event_to_x
    from learners.checkpoint import save_checkpoint
    from learners.registry import make_learner
    from streams.simulator import ClickSimulator, SimulatorConfig

    root = tmp_path_factory.mktemp("artifacts")
    config = SimulatorConfig(seed=11, n_users=200, n_items=300, slate_size=5, drift_every=None)
    events = list(ClickSimulator(config).events(max_events=3000))
    impressions = [e for e in events if e.kind == "impression"]
    learner = make_learner("two-tower", out_dim=16, hidden=(32,), field_dim=8, seed=0)
    for start in range(0, len(impressions), 256):
        batch = impressions[start:start + 256]
        learner.learn_many([event_to_x(e) for e in batch], np.array([e.label for e in batch]))
    checkpoint = root / "two-tower.ckpt"
    save_checkpoint(checkpoint, learner, {}, events_learned=len(impressions))
    catalogue = Catalogue()
    catalogue.extend(events)
    snap = catalogue.snapshot()
    cat_path = root / "catalogue.jsonl"
    cat_path.write_bytes(b"".join(
        orjson.dumps({"item_id": i, "item_features": {k[2:]: v for k, v in x.items() if k.startswith("i:")}}) + b"\n"
        for i, x in zip(snap.ids, snap.xs)
    ))
    service = IndexerService(ArtifactStore(root / "index"), catalogue, FileCheckpointSource(checkpoint))
    outcome = service.build_once(trigger="test")
    assert outcome.status == "published", outcome
    return Artifacts(checkpoint=checkpoint, index_root=root / "index", catalogue=cat_path, sim_config=config,
                     events_learned=len(impressions), index_ids=frozenset(snap.ids), service=service)
