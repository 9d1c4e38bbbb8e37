"""The scorer's HTTP endpoint (stdlib only), in the same process as ``/metrics``.

Routes (GET only):

``/recommend?user_id=U[&k=10][&request_id=R][&features={json}][&<feature>=<value>...]``
    Ranked candidates for a user, as JSON (the rankings-topic record). User features
    come either as one ``features`` JSON object (typed values: numbers stay numbers)
    or as extra query parameters (string values; a repeated parameter is a list). A
    malformed request gets 400 with ``{"error": ...}`` saying what to fix; 503 while
    no model or index is loaded.
``/healthz``
    200 while the process is alive.
``/readyz``
    200 when a model and an index are loaded, else 503 with the reason.
``/metrics``
    The Prometheus exposition of the process registry.

>>> parse_recommend_query("user_id=u1&k=5&age=18-24&genre=a&genre=b")
ScoreRequest(request_id='', user_id='u1', user_features={'age': '18-24', 'genre': ('a', 'b')}, k=5)
>>> parse_recommend_query("k=5")
Traceback (most recent call last):
...
serving.errors.BadRequestError: missing query parameter 'user_id' (e.g. /recommend?user_id=u42&k=10)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import REGISTRY, CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from serving.errors import BadRequestError, NotReadyError
from serving.metrics import Metrics
from serving.online_eval import OnlineEvaluator
from serving.scorer import Scorer, ScoreRequest
from streams.errors import EventValidationError
from streams.events import SCHEMA_VERSION, event_from_dict

__all__ = ["ServingHTTPServer", "make_http_server", "serve_in_thread", "parse_recommend_query"]

logger = logging.getLogger(__name__)

_RESERVED = ("user_id", "k", "request_id", "features")


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequestError(f"query parameter {name!r} given {len(values)} times; give it once")
    return values[0]


def parse_recommend_query(query: str) -> ScoreRequest:
    """Parse and validate a ``/recommend`` query string (raises :class:`BadRequestError`)."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=200)
    except ValueError as exc:
        raise BadRequestError(f"bad query string: {exc}") from None
    user_id = _one(params, "user_id")
    if not user_id:
        raise BadRequestError("missing query parameter 'user_id' (e.g. /recommend?user_id=u42&k=10)")
    k_raw = _one(params, "k")
    k: int | None = None
    if k_raw is not None:
        try:
            k = int(k_raw)
        except ValueError:
            raise BadRequestError(f"k must be an integer in 1..10000, got {k_raw!r}") from None
    features: dict[str, Any] = {}
    raw = _one(params, "features")
    if raw is not None:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequestError(f"features must be a JSON object of feature -> value: {exc}") from None
        if not isinstance(obj, dict):
            raise BadRequestError("features must be a JSON object of feature -> value")
        features.update(obj)
    for name, values in params.items():
        if name in _RESERVED:
            continue
        features[name] = values[0] if len(values) == 1 else list(values)
    request_id = _one(params, "request_id") or ""
    record = {
        "schema_version": SCHEMA_VERSION, "kind": "request", "event_id": request_id or "http",
        "event_time": 0.0, "user_id": user_id, "request_id": request_id or "http",
        "user_features": features, "k": k,
    }
    if k is None:
        del record["k"]
    try:
        event = event_from_dict(record)  # the event contract's validation, one set of rules
    except EventValidationError as exc:
        raise BadRequestError(str(exc)) from None
    return ScoreRequest(request_id=request_id, user_id=event.user_id, user_features=event.user_features, k=event.k)


class ServingHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows the scorer, the registry and the metrics."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], scorer: Scorer, *, registry: CollectorRegistry = REGISTRY,
                 metrics: Metrics | None = None, evaluator: OnlineEvaluator | None = None) -> None:
        super().__init__(address, _Handler)
        self.scorer = scorer
        self.registry = registry
        self.metrics = metrics
        self.evaluator = evaluator
        self.started_at = time.time()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: ServingHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))

    def _count(self, outcome: str) -> None:
        if self.server.metrics is not None:
            self.server.metrics.requests.labels(source="http", outcome=outcome).inc()

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        route = url.path.rstrip("/") or "/"
        if route == "/healthz":
            self._json(200, {"status": "alive", "uptime_seconds": time.time() - self.server.started_at})
        elif route == "/readyz":
            ready, reason = self.server.scorer.readiness()
            self._json(200 if ready else 503, {"ready": ready, "reason": reason})
        elif route == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif route == "/recommend":
            self._recommend(url.query)
        else:
            self._json(404, {"error": f"no route {url.path!r}; try /recommend, /healthz, /readyz or /metrics"})

    def _recommend(self, query: str) -> None:
        try:
            request = parse_recommend_query(query)
            if not request.request_id:
                request = ScoreRequest(f"http-{uuid.uuid4().hex}", request.user_id, request.user_features, request.k)
            scorer = self.server.scorer
            ranking = scorer.score(request)
        except BadRequestError as exc:
            self._count("invalid")
            self._json(400, {"error": str(exc)})
            return
        except NotReadyError as exc:
            self._count("unavailable")
            self._json(503, {"error": f"not ready: {exc}"})
            return
        except Exception as exc:  # a bug must answer 500, not kill the handler thread silently
            logger.exception("scoring failed for %s", query)
            self._count("error")
            self._json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            return
        self._count("ok")
        evaluator = self.server.evaluator
        if evaluator is not None:
            model = scorer.learner_source.current()
            if model is not None and model.version == ranking.model_version:
                evaluator.record_served(ranking.request_id, model)
        self._json(200, ranking.to_dict())

    def _not_allowed(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815


def make_http_server(scorer: Scorer, *, host: str = "0.0.0.0", port: int = 8080,
                     registry: CollectorRegistry = REGISTRY, metrics: Metrics | None = None,
                     evaluator: OnlineEvaluator | None = None) -> ServingHTTPServer:
    """Bind the server (``port=0`` picks a free one; see ``server.port``)."""
    return ServingHTTPServer((host, port), scorer, registry=registry, metrics=metrics, evaluator=evaluator)


def serve_in_thread(server: ServingHTTPServer, poll_interval_s: float = 0.1) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread; stop with ``server.shutdown()``
    (which returns within ``poll_interval_s``)."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval_s,), name="http", daemon=True)
    thread.start()
    logger.info("HTTP on %s:%d (/recommend /healthz /readyz /metrics)", *server.server_address[:2])
    return thread

