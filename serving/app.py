"""The scorer process: every serving piece wired together (what ``towerstream serve`` runs).

One process holds:

* an :class:`~indexer.handle.IndexHolder` kept current by an
  :class:`~indexer.watcher.IndexWatcher` on the control topic (without Kafka: by polling
  the artifact store's ``CURRENT``), and the served model: by default the one each index
  version was built from, loaded before that version is swapped in
  (:class:`~serving.version_model.VersionLearnerSource`), or the newest learner checkpoint,
  reloaded in the background (:class:`~serving.scorer.CheckpointLearnerSource`,
  ``model_from="checkpoint"``);
* the :class:`~serving.scorer.Scorer`;
* the HTTP server (``/recommend``, ``/healthz``, ``/readyz``, ``/metrics``);
* with Kafka: the request loop (requests -> rankings) and the events follower
  (impressions/clicks -> online AUC, item features for the pre-ranker), each in a thread;
* with Kafka: the item-delta follower (:class:`~indexer.item_follow.ItemDeltaFollower`):
  new, changed and retired items from ``<prefix>.items`` are applied to the served version
  within a poll, embedded with that version's frozen item tower, so an item is
  retrievable seconds after its event instead of after the next full rebuild
  (``towerstream_item_freshness_seconds``).

A loop that dies (e.g. the rankings could not be delivered) stops the app, and
:meth:`ServingApp.wait` re-raises its error so the process exits non-zero and its
supervisor restarts it from the last commit.
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry

from indexer.artifacts import ArtifactStore
from indexer.delta import DeltaLog
from indexer.freshness import FreshnessMetrics
from indexer.handle import IndexHolder, load_handle
from indexer.item_follow import ItemDeltaFollower, covered_seq, items_partition
from indexer.watcher import IndexWatcher
from serving.http import ServingHTTPServer, make_http_server, serve_in_thread
from serving.metrics import Metrics
from serving.online_eval import OnlineEvalConfig, OnlineEvaluator
from serving.request_consumer import (
    EventsFollower,
    RequestConsumer,
    close_loop,
    open_events_follower,
    open_request_consumer,
)
from serving.scorer import CheckpointLearnerSource, ItemFeatureStore, LearnerSource, Scorer
from serving.version_model import VersionLearnerSource
from streams.errors import ConfigError, TowerstreamError
from streams.exposition import ThreadCPUCollector, watch_gc_pauses
from streams.deadletter import DeadLetterWriter
from streams.topics import DEFAULT_PARTITIONS, ITEMS_PARTITIONS, Topics
from streams.transport import KafkaSettings, Producer, ensure_topics, make_consumer, make_producer

__all__ = ["ServeConfig", "ServingApp"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the scorer process needs, read once by the CLI.

    Parameters
    ----------
    index_root
        The indexer's artifact store root.
    checkpoint
        A learner checkpoint file, or a directory of them (newest ``checkpoint_pattern``):
        the served model with ``model_from="checkpoint"``.
    model_from
        ``"index"``: serve the model each index version was built from (its ``tower.ckpt``,
        :mod:`serving.version_model`); ``"checkpoint"``: the newest learner checkpoint.
        Default: ``"checkpoint"`` when ``checkpoint`` is given, else ``"index"``.
    kafka
        Kafka settings; None serves HTTP only (the index is then polled from the store).
    topics
        Topic names of the deployment.
    host, port
        HTTP bind address (``/metrics`` included); ``port=0`` picks a free port.
    k_retrieve, k_default
        ANN candidates per request, items returned when a request does not say.
    group_id, eval_group_id
        Consumer groups of the request loop and of the events follower.
    catalogue
        Optional JSON-lines item catalogue (features for the pre-ranker).
    shadows
        Learner name -> checkpoint path, evaluated online beside the served model.
    eval_window_s
        Event-time window in which a click joins its impression.
    score_batch
        Requests scored together.
    commit_interval_s
        The request loop flushes its rankings and commits at most this often (0: every batch).
    online_eval
        Follow the events topic for online AUC (Kafka only).
    item_deltas
        Apply item events to the served index between rebuilds (Kafka only).
    """

    index_root: Path
    checkpoint: Path | None = None
    model_from: str | None = None
    kafka: KafkaSettings | None = None
    topics: Topics = Topics()
    host: str = "0.0.0.0"
    port: int = 8080
    k_retrieve: int = 100
    k_default: int = 10
    group_id: str = "towerstream-scorer"
    eval_group_id: str = "towerstream-scorer-eval"
    checkpoint_pattern: str = "*.ckpt"
    checkpoint_poll_s: float = 1.0
    index_poll_s: float = 1.0
    catalogue: Path | None = None
    shadows: Mapping[str, Path] = field(default_factory=dict)
    eval_window_s: float = 60.0
    score_batch: int = 64
    commit_interval_s: float = 1.0
    online_eval: bool = True
    item_deltas: bool = True

    def __post_init__(self) -> None:
        if self.model_from is None:
            object.__setattr__(self, "model_from", "index" if self.checkpoint is None else "checkpoint")
        if self.model_from not in ("index", "checkpoint"):
            raise ConfigError(f"--model-from must be index or checkpoint, got {self.model_from!r}")
        if self.model_from == "checkpoint" and self.checkpoint is None:
            raise ConfigError("--model-from checkpoint needs --checkpoint PATH (a learner checkpoint or a directory)")
        if self.k_retrieve < 1 or self.k_default < 1:
            raise ConfigError(f"--k-retrieve and --k must be >= 1, got {self.k_retrieve} and {self.k_default}")
        if self.commit_interval_s < 0:
            raise ConfigError(f"--commit-interval must be >= 0 seconds, got {self.commit_interval_s}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.catalogue is not None and not Path(self.catalogue).is_file():
            raise ConfigError(f"--catalogue {self.catalogue} is not a file (JSON lines of item_id + item_features)")


class ServingApp:
    """Builds, starts and stops the scorer process's parts (see the module docstring).

    Parameters
    ----------
    config
        The settings.
    registry
        Where metrics go (the process default; tests pass their own).
    """

    def __init__(self, config: ServeConfig, *, registry: CollectorRegistry = REGISTRY) -> None:
        self.config = config
        self.registry = registry
        self.metrics = Metrics(registry=registry)
        registry.register(ThreadCPUCollector())  # where the request loop's time goes, per thread
        self._unwatch_gc = watch_gc_pauses(registry)  # every collector pause stalls every request
        self.holder = IndexHolder()
        self.models: CheckpointLearnerSource | VersionLearnerSource
        if config.model_from == "index":
            self.models = VersionLearnerSource(self.holder, on_load=self.metrics.on_model_loaded,
                                               # a version's model fills its item-side cache before it serves
                                               prepare=lambda model, base: self.scorer.prepare(model, base))
        else:
            assert config.checkpoint is not None
            self.models = CheckpointLearnerSource(config.checkpoint, pattern=config.checkpoint_pattern,
                                                  poll_interval_s=config.checkpoint_poll_s,
                                                  on_load=self.metrics.on_model_loaded,
                                                  # a new model fills its item-side cache before it serves
                                                  prepare=lambda handle: self.scorer.prepare(handle))
        self.shadows: dict[str, CheckpointLearnerSource] = {
            name: CheckpointLearnerSource(path, pattern=config.checkpoint_pattern,
                                          poll_interval_s=max(config.checkpoint_poll_s, 5.0))
            for name, path in config.shadows.items()
        }
        self.items = ItemFeatureStore()
        if config.catalogue is not None:
            n = self.items.load_jsonl(config.catalogue)
            logger.info("read %d catalogue items from %s", n, config.catalogue)
        self.scorer = Scorer(self.models, self.holder, k_retrieve=config.k_retrieve, k_default=config.k_default,
                             item_xs=self.items, metrics=self.metrics)
        shadow_sources: dict[str, LearnerSource] = dict(self.shadows)
        self.evaluator = OnlineEvaluator(OnlineEvalConfig(window_seconds=config.eval_window_s),
                                         metrics=self.metrics, shadows=shadow_sources)
        self.metrics.track(self.models, self.holder)
        self.http: ServingHTTPServer | None = None
        self.watcher: IndexWatcher | None = None
        self.requests: RequestConsumer | None = None
        self.follower: EventsFollower | None = None
        self.freshness: FreshnessMetrics | None = None
        self.item_follower: ItemDeltaFollower | None = None
        self._items_producer: Producer | None = None
        self._threads: list[threading.Thread] = []
        self._swapper: Callable[[Any], object] | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ index without Kafka
    def _poll_store(self) -> None:
        store = ArtifactStore(self.config.index_root)
        while True:
            try:
                version = store.current()
                if version is not None and version != self.holder.version:
                    handle = load_handle(store.version_dir(version))
                    self._swap(handle)
                    self.metrics.on_index_swap(handle)
            except (TowerstreamError, OSError, RuntimeError) as exc:
                logger.error("index poll of %s failed: %s; still serving %s",
                             self.config.index_root, exc, self.holder.version)
            if self._stop.wait(self.config.index_poll_s):
                return

    def _swap(self, base: Any) -> object:
        """Serve index version ``base``: its model first (``model_from="index"``), then the
        index (with the item deltas it does not cover, when deltas are followed)."""
        if isinstance(self.models, VersionLearnerSource):
            self.models.load_for(base)
        if self._swapper is not None:
            return self._swapper(base)
        return self.holder.swap(base)

    def _spawn(self, name: str, target: object) -> None:
        def run() -> None:
            try:
                target()  # type: ignore[operator]
            except BaseException as exc:  # recorded and re-raised by wait(): the process must exit
                logger.exception("%s stopped with an error", name)
                self.error = exc
                self._stop.set()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def start(self) -> "ServingApp":
        """Load what is there, bind HTTP, start the loops; returns self."""
        cfg = self.config
        self.models.start()
        for source in self.shadows.values():
            source.start()
        self.http = make_http_server(self.scorer, host=cfg.host, port=cfg.port, registry=self.registry,
                                     metrics=self.metrics, evaluator=self.evaluator)
        self._threads.append(serve_in_thread(self.http))
        if cfg.kafka is None:
            self._spawn("index-poll", self._poll_store)
            return self
        t = cfg.topics
        ensure_topics(cfg.kafka, {t.requests: DEFAULT_PARTITIONS, t.rankings: DEFAULT_PARTITIONS,
                                  t.events: DEFAULT_PARTITIONS, t.dead_letter: DEFAULT_PARTITIONS})
        swapper = None
        if cfg.item_deltas:
            ensure_topics(cfg.kafka, {t.items: ITEMS_PARTITIONS})
            self.freshness = FreshnessMetrics(self.registry)
            self._items_producer = make_producer(cfg.kafka)
            self.item_follower = ItemDeltaFollower(
                self.holder,
                DeltaLog(on_fresh=self.freshness.observe, on_refused=self.freshness.refused),
                DeadLetterWriter(self._items_producer, t.dead_letter, "scorer-items"),
                on_upsert=self.items.upsert, on_served=self.freshness.served, min_covered=self._min_covered)
            swapper = self.item_follower.swap_base
        self._swapper = swapper
        self.watcher = IndexWatcher(cfg.kafka, self.holder, cfg.index_root, topics=t,
                                    on_swap=self.metrics.on_index_swap, swapper=self._swap).start()
        if self.item_follower is not None:
            self._spawn("items", self._follow_items)
        self.requests = open_request_consumer(cfg.kafka, self.scorer, group_id=cfg.group_id, topics=t,
                                              metrics=self.metrics, evaluator=self.evaluator,
                                              score_batch=cfg.score_batch,
                                              commit_interval_s=cfg.commit_interval_s)
        self._spawn("requests", self.requests.run)
        if cfg.online_eval:
            self.follower = open_events_follower(cfg.kafka, self.evaluator, group_id=cfg.eval_group_id, topics=t,
                                                 items=self.items, metrics=self.metrics)
            self._spawn("events", self.follower.run)
        return self

    def freeze_gc_when_warm(self, settle_s: float = 5.0) -> None:
        """From a daemon thread: once a model and an index serve (and ``settle_s`` more
        seconds, in which the first answers import and build what scoring builds lazily),
        move every object alive to the collector's permanent generation (``gc.freeze``).
        ``towerstream serve`` freezes at start-up, but the model, the index, the torch and
        FAISS code they pull in arrive later: tens of thousands of objects that every full
        collection would otherwise rescan (measured in the demo: full collections of
        ~170 ms, each a stall of every request in flight)."""
        def run() -> None:
            while not self.scorer.readiness()[0]:
                if self._stop.wait(0.5):
                    return
            if not self._stop.wait(settle_s):
                gc.freeze()
                logger.info("warm: %d objects frozen out of the garbage collector's scans", gc.get_freeze_count())

        threading.Thread(target=run, name="gc-freeze", daemon=True).start()

    def _min_covered(self) -> int | None:
        """The smallest item-log sequence covered by a version a rollback could serve."""
        seqs = [covered_seq(info) for info in ArtifactStore(self.config.index_root).list_versions()]
        return None if not seqs or any(s is None for s in seqs) else min(s for s in seqs if s is not None)

    def _follow_items(self) -> None:
        cfg = self.config
        assert cfg.kafka is not None and self.item_follower is not None
        consumer = make_consumer(cfg.kafka, None)
        try:
            consumer.assign([items_partition(consumer, cfg.topics)])  # no group: the whole item log, every start
            while not self._stop.is_set():
                self.item_follower.poll_once(consumer, timeout_s=0.2)
        finally:
            consumer.close()

    @property
    def port(self) -> int:
        """The bound HTTP port."""
        if self.http is None:
            raise RuntimeError("ServingApp.start() first")
        return self.http.port

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`stop` or a loop failure (re-raised here); False on timeout."""
        stopped = self._stop.wait(timeout_s)
        if self.error is not None:
            raise self.error
        return stopped

    def request_stop(self) -> None:
        """Make :meth:`wait` return (signal-safe); call :meth:`stop` afterwards."""
        self._stop.set()

    def stop(self) -> None:
        """Stop the loops (each finishes the batch in hand), the watcher and HTTP."""
        self._stop.set()
        for loop in (self.requests, self.follower):
            if loop is not None:
                loop.stop()
        for thread in self._threads:
            if thread.name != "http":
                thread.join(timeout=30.0)
        for loop in (self.requests, self.follower):
            if loop is not None:
                close_loop(loop)
        if self.watcher is not None:
            self.watcher.stop()
        if self._items_producer is not None:
            self._items_producer.close()
        self.models.stop()
        for source in self.shadows.values():
            source.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self._unwatch_gc()
