"""The HTTP endpoint on a real socket: /recommend, /healthz, /readyz, /metrics, errors."""

from __future__ import annotations

import json
import socket
from typing import Any, Iterator
from urllib.parse import quote

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from indexer.handle import IndexHolder
from serving.http import make_http_server, serve_in_thread
from serving.metrics import Metrics
from serving.online_eval import OnlineEvaluator
from serving.scorer import ModelHandle, Scorer


class Source:
    def __init__(self, handle: ModelHandle | None) -> None:
        self.handle = handle

    def current(self) -> ModelHandle | None:
        return self.handle


@pytest.fixture
def server(fakes: Any) -> Iterator[Any]:
    vecs = np.eye(4, dtype=np.float32)
    holder = IndexHolder()
    source = Source(None)
    reg = CollectorRegistry()
    metrics = Metrics(registry=reg)
    evaluator = OnlineEvaluator()
    scorer = Scorer(source, holder, k_retrieve=4, metrics=metrics)
    srv = make_http_server(scorer, host="127.0.0.1", port=0, registry=reg, metrics=metrics, evaluator=evaluator)
    serve_in_thread(srv)

    def load() -> None:
        source.handle = ModelHandle(fakes.FakeTwoTower(prerank={"i0": 0.1, "i1": 0.9}), "fake", 3)
        holder.swap(fakes.flat_handle(5, ["i0", "i1", "i2", "i3"], vecs))

    srv.test = type("T", (), {"load": staticmethod(load), "reg": reg, "evaluator": evaluator,
                              "base": f"http://127.0.0.1:{srv.port}", "get": staticmethod(fakes.http_get)})
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_readyz_reports_why_until_model_and_index_are_loaded(server: Any) -> None:
    t = server.test
    status, body = t.get(f"{t.base}/readyz")
    assert status == 503
    assert json.loads(body) == {"ready": False, "reason": "no model loaded; no index loaded"}
    assert t.get(f"{t.base}/healthz")[0] == 200  # alive all along
    status, body = t.get(f"{t.base}/recommend?user_id=u1")
    assert status == 503 and "no model loaded" in json.loads(body)["error"]
    t.load()
    status, body = t.get(f"{t.base}/readyz")
    assert (status, json.loads(body)["ready"]) == (200, True)


def test_recommend_returns_the_ranked_list(server: Any) -> None:
    t = server.test
    t.load()
    status, body = t.get(f"{t.base}/recommend?user_id=u1&k=2&request_id=req-7&age=18-24")
    assert status == 200
    obj = json.loads(body)
    assert obj["request_id"] == "req-7" and obj["user_id"] == "u1"
    assert [(i["item_id"], i["rank"]) for i in obj["items"]] == [("i1", 1), ("i0", 2)]
    assert obj["items"][0]["score"] == 0.9
    assert (obj["index_version"], obj["model_version"], obj["learner"]) == (5, 3, "fake")
    assert obj["latency_seconds"] > 0
    assert t.evaluator.stats()["served_remembered"] == 1
    # Without request_id one is generated, unique per call.
    ids = {json.loads(t.get(f"{t.base}/recommend?user_id=u2")[1])["request_id"] for _ in range(2)}
    assert len(ids) == 2 and all(i.startswith("http-") for i in ids)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("k=3", "missing query parameter 'user_id'"),
        ("user_id=u1&k=ten", "k must be an integer"),
        ("user_id=u1&k=0", "'k' must be in 1..10000"),
        ("user_id=u1&k=1&k=2", "given 2 times"),
        ("user_id=u1&features=[1]", "features must be a JSON object"),
        ("user_id=u1&features={bad", "features must be a JSON object"),
        ("user_id=u1&features=" + quote(json.dumps({"age": {"nested": 1}})), "feature user_features.age"),
        ("user_id=" + "x" * 300, "must be 1..256 characters"),
    ],
)
def test_bad_input_gets_a_clear_400(server: Any, query: str, message: str) -> None:
    t = server.test
    t.load()
    status, body = t.get(f"{t.base}/recommend?{query}")
    assert status == 400, body
    assert message in json.loads(body)["error"]


def test_metrics_count_http_outcomes(server: Any) -> None:
    t = server.test
    t.get(f"{t.base}/recommend?user_id=u1")  # not ready yet
    t.load()
    t.get(f"{t.base}/recommend?user_id=u1")
    t.get(f"{t.base}/recommend?k=1")
    status, body = t.get(f"{t.base}/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    for outcome in ("ok", "invalid", "unavailable"):
        assert samples[("towerstream_requests_total", (("outcome", outcome), ("source", "http")))] == 1.0
    assert samples[("towerstream_score_latency_seconds_count", (("stage", "total"),))] == 1.0


def test_unknown_route_and_method(server: Any) -> None:
    t = server.test
    assert t.get(f"{t.base}/nope")[0] == 404
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 405")
