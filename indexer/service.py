"""The background indexer: checkpoint -> item vectors -> index -> guardrail -> publish -> announce.

Every ``period_s`` (or as soon as the learner has learned ``every_n_updates`` more
events, whichever comes first) the service

1. loads the latest learner checkpoint (never a live model) and freezes its item tower;
2. embeds the catalogue (every item seen on the stream, plus the catalogue file);
3. builds an index (:func:`~indexer.build.build_index`, reusing trained centroids);
4. asks the :class:`~indexer.guardrail.Guardrail` (probe recall, held-out AUC, item
   count) whether the build is no worse than the served one;
5. writes the version atomically, re-points ``CURRENT``, announces it on the control
   topic and applies retention.

A period in which neither the checkpoint nor the catalogue changed builds nothing.
So an item first seen at time t is served by t + ``period_s`` + one build (+ the poll
interval of :meth:`IndexerService.run`).

Metrics are plain attributes of :class:`IndexerMetrics` for now (the lead maps them to
Prometheus).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import numpy as np

from indexer.announce import Announcement, Announcer
from indexer.artifacts import TRAINED_FILE, ArtifactStore
from indexer.build import BuildConfig, BuildResult, TrainedState, build_index
from indexer.catalogue import Catalogue
from indexer.errors import IndexerError
from indexer.guardrail import Guardrail, GuardrailDecision, TwoTowerEncoder, retrieval_auc
from learners.base import X
from streams.errors import TowerstreamError

__all__ = [
    "FrozenModel",
    "CheckpointSource",
    "FileCheckpointSource",
    "IndexerMetrics",
    "BuildOutcome",
    "IndexerService",
    "HeldOutProvider",
]

log = logging.getLogger(__name__)

Status = Literal["published", "refused", "skipped", "failed"]


@dataclass(frozen=True, eq=False)
class FrozenModel:
    """A model restored from a checkpoint, used read-only to embed items and users."""

    encoder: TwoTowerEncoder
    source: str
    offsets: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    events_learned: int = 0
    created_at: float = 0.0
    spec: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_bytes: bytes | None = None  # kept beside the version: the frozen tower of its deltas


class CheckpointSource(Protocol):
    """Where the service gets frozen models from."""

    def stamp(self) -> object | None:
        """A cheap marker that changes whenever a new checkpoint is written (None: none yet)."""
        ...

    def load(self) -> FrozenModel:
        """Load the latest checkpoint."""
        ...


class FileCheckpointSource:
    """The checkpoint file a learner keeps replacing atomically (``learners.checkpoint``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileCheckpointSource(path={str(self.path)!r})"

    def stamp(self) -> object | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> FrozenModel:
        from learners.checkpoint import CheckpointError, checkpoint_from_bytes

        try:
            data = self.path.read_bytes()  # once: these exact bytes are the version's tower
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {self.path}") from None
        ck = checkpoint_from_bytes(data, str(self.path))
        learner = ck.learner()
        if not (hasattr(learner, "encode_items") and hasattr(learner, "encode_users")):
            raise IndexerError(
                f"the learner in {self.path} ({ck.spec.get('name')}) has no item tower "
                "(encode_items/encode_users): index a two-tower learner's checkpoint"
            )
        return FrozenModel(encoder=learner, source=str(self.path), offsets=ck.offsets,
                           events_learned=ck.events_learned, created_at=ck.created_at, spec=ck.spec,
                           checkpoint_bytes=data)


HeldOutProvider = Callable[[FrozenModel], tuple[Sequence[X], np.ndarray]]


@dataclass
class IndexerMetrics:
    """Counters and gauges of the service (plain Python; map them to Prometheus).

    ``index_age_seconds(now)`` is a derived gauge: seconds since the served version was
    published.
    """

    builds_total: int = 0
    refused_total: int = 0
    failed_total: int = 0
    skipped_total: int = 0
    retrains_total: int = 0
    last_build_seconds: float = math.nan
    last_recall: float = math.nan
    last_auc: float = math.nan
    index_version: int | None = None
    index_items: int = 0
    last_publish_time: float | None = None
    retrieval: Mapping[str, Any] | None = None  # RetrievalReport.as_dict() of the latest version measured

    def index_age_seconds(self, now: float | None = None) -> float:
        """Seconds since the served version was published (NaN if none)."""
        if self.last_publish_time is None:
            return math.nan
        return (time.time() if now is None else now) - self.last_publish_time

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BuildOutcome:
    """What one build attempt did."""

    status: Status
    version: int | None = None
    reasons: tuple[str, ...] = ()
    seconds: float = 0.0
    manifest: Mapping[str, Any] | None = None
    decision: GuardrailDecision | None = None
    phases: Mapping[str, float] = field(default_factory=dict)  # seconds per step of a published build


class IndexerService:
    """Periodic, guarded index builds.

    Parameters
    ----------
    store
        Where versions are written and served from.
    catalogue
        The items to index (filled by a :class:`~indexer.follow.StreamFollower` and/or a file).
    checkpoints
        Source of frozen models (:class:`FileCheckpointSource`).
    build_config
        Index settings.
    guardrail
        Judges each build against the served one.
    announcer
        Announces published versions (None: no announcements, e.g. offline builds).
    held_out
        ``held_out(model) -> (xs, ys)``: labelled impressions the model has not learned
        (e.g. :meth:`RecentWindow.held_out` with the model's offsets). Their users are
        also the probe queries for recall. None: no AUC check, item probes.
    period_s
        Seconds between builds.
    every_n_updates
        Build early once the checkpoint learned this many events more than the served
        version's (None: period only).
    embed_batch
        Most items per ``encode_items`` call (bounds the memory of one call). A two-tower
        learner chunks its tower by itself and resolves each distinct feature value once
        per call, so fewer, larger calls are faster: one call per build embedded 200k items
        at 1.40M items/s, calls of 16k at 1.02M (plain two-tower, one torch thread).
    clock
        Monotonic time source (injected so tests drive time).
    wall_clock
        Epoch time source for manifests and index age.
    retrieval
        ``retrieval(encoder, offsets, index, vectors, ids, xs, ys, version)`` after each
        publish (:class:`~indexer.evaluation.RetrievalEvaluator`): Recall/HR/NDCG@K on
        the held-out clicks, kept in ``metrics.retrieval`` (None: not measured).
    build_hook
        Passed to :meth:`ArtifactStore.write_version` (crash tests).
    """

    def __init__(
        self,
        store: ArtifactStore,
        catalogue: Catalogue,
        checkpoints: CheckpointSource,
        *,
        build_config: BuildConfig = BuildConfig(),
        guardrail: Guardrail | None = None,
        announcer: Announcer | None = None,
        held_out: HeldOutProvider | None = None,
        period_s: float = 60.0,
        every_n_updates: int | None = None,
        embed_batch: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        build_hook: Callable[[str, Path], None] | None = None,
        retrieval: Callable[..., Any] | None = None,
    ) -> None:
        if period_s <= 0:
            raise IndexerError(f"period_s must be > 0 seconds, got {period_s}")
        if every_n_updates is not None and every_n_updates < 1:
            raise IndexerError(f"every_n_updates must be >= 1 or None, got {every_n_updates}")
        self.store = store
        self.catalogue = catalogue
        self.checkpoints = checkpoints
        self.build_config = build_config
        self.guardrail = guardrail if guardrail is not None else Guardrail()
        self.announcer = announcer
        self.held_out = held_out
        self.period_s = period_s
        self.every_n_updates = every_n_updates
        self.embed_batch = embed_batch
        self.clock = clock
        self.wall_clock = wall_clock
        self.build_hook = build_hook
        self.retrieval = retrieval
        self.metrics = IndexerMetrics()
        self._trained: TrainedState | None = None
        self._served_encoder: tuple[int, TwoTowerEncoder] | None = None  # (version, encoder)
        self._done_key: tuple[object, int] | None = None  # (checkpoint stamp, catalogue revision) judged last
        self._tried_stamp: object | None = None  # checkpoint stamp of the last attempt, whatever its end
        self._built_events: int | None = None
        self._last_attempt: float | None = None
        self._cached: tuple[object, FrozenModel] | None = None
        self._started = False

    def __repr__(self) -> str:
        return (f"IndexerService(store={self.store!r}, checkpoints={self.checkpoints!r}, "
                f"period_s={self.period_s}, every_n_updates={self.every_n_updates})")

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Clean leftovers of crashed builds and pick up the served version's state."""
        self.store.clean_temp()
        info = self.store.current_info()
        if info is not None:
            m = info.manifest
            self.metrics.index_version = info.version
            self.metrics.index_items = int(m.get("item_count", 0))
            self.metrics.last_publish_time = m.get("published_at", m.get("created_at"))
            self._built_events = m.get("checkpoint", {}).get("events_learned")
            trained_meta = m.get("trained")
            if trained_meta and (info.path / TRAINED_FILE).exists():
                self._trained = TrainedState(template=(info.path / TRAINED_FILE).read_bytes(), **trained_meta)
        self._started = True

    # ------------------------------------------------------------------ scheduling
    def _model(self, stamp: object) -> FrozenModel:
        if self._cached is not None and self._cached[0] == stamp:
            return self._cached[1]
        model = self.checkpoints.load()
        self._cached = (stamp, model)
        return model

    def due(self) -> str | None:
        """Why a build is due now (``"period"``, ``"updates"``, ``"first"``), or None."""
        now = self.clock()
        if self._last_attempt is None:
            return "first"
        if now - self._last_attempt >= self.period_s:
            return "period"
        if self.every_n_updates is not None:
            stamp = self.checkpoints.stamp()
            if stamp is not None and stamp != self._tried_stamp:
                model = self._model(stamp)
                if model.events_learned - (self._built_events or 0) >= self.every_n_updates:
                    return "updates"
        return None

    def tick(self) -> BuildOutcome | None:
        """Build if one is due; returns the outcome, or None when nothing was due."""
        self.metrics.index_version = self.store.current()  # an operator may have rolled back
        reason = self.due()
        if reason is None:
            return None
        return self.build_once(trigger=reason)

    def run(self, stop: threading.Event, poll_s: float | None = None) -> None:
        """Tick until ``stop`` is set. Errors of one build are counted and logged; the loop goes on."""
        if not self._started:
            self.start()
        poll = min(1.0, self.period_s / 10) if poll_s is None else poll_s
        while not stop.is_set():
            self.tick()
            stop.wait(poll)

    # ------------------------------------------------------------------ one build
    def _embed(self, encoder: TwoTowerEncoder, xs: Sequence[X]) -> np.ndarray:
        parts = [np.asarray(encoder.encode_items(xs[i:i + self.embed_batch]), dtype=np.float32)
                 for i in range(0, len(xs), self.embed_batch)]
        vectors = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(xs):
            raise IndexerError(f"encode_items returned shape {vectors.shape} for {len(xs)} items; expected (N, D)")
        return vectors

    def _probe_queries(self, encoder: TwoTowerEncoder, xs: Sequence[X]) -> np.ndarray | None:
        if not xs:
            return None
        seen: dict[Any, X] = {}
        for x in xs:
            seen.setdefault(x.get("user_id"), x)
            if len(seen) >= self.build_config.probe_queries:
                break
        return np.asarray(encoder.encode_users(list(seen.values())), dtype=np.float32)

    def _baseline(self, xs: Sequence[X], ys: np.ndarray) -> dict[str, Any] | None:
        info = self.store.current_info()
        if info is None:
            return None
        m = info.manifest
        auc = m.get("quality", {}).get("auc")
        if self._served_encoder is not None and self._served_encoder[0] == info.version and len(xs):
            # Same window for both models: a fair comparison.
            auc = retrieval_auc(self._served_encoder[1], xs, ys)
        return {"version": info.version, "recall": m.get("recall", {}).get("value"), "auc": auc,
                "item_count": m.get("item_count")}

    def build_once(self, trigger: str = "manual") -> BuildOutcome:
        """Run one build now; never raises for a bad build (the outcome says what happened)."""
        if not self._started:
            self.start()
        t0 = time.perf_counter()
        self._last_attempt = self.clock()
        try:
            stamp = self.checkpoints.stamp()
            if stamp is None:
                raise IndexerError(f"no checkpoint yet ({self.checkpoints!r}); the learner writes one")
            self._tried_stamp = stamp
            pinned = self.store.pinned()
            if pinned is not None:
                self.metrics.skipped_total += 1
                return BuildOutcome("skipped", version=self.store.current(), reasons=(
                    f"publishing is pinned to version {pinned} (`towerstream index unpin` resumes)",))
            snap = self.catalogue.snapshot()
            if len(snap) == 0:
                self.metrics.skipped_total += 1
                return BuildOutcome("skipped", reasons=("the catalogue is empty",))
            key = (stamp, snap.revision)
            if key == self._done_key:
                self.metrics.skipped_total += 1
                return BuildOutcome("skipped", version=self.metrics.index_version,
                                    reasons=("checkpoint and catalogue unchanged",))
            model = self._model(stamp)
            return self._build(model, snap, key, trigger, t0)
        except (TowerstreamError, OSError, RuntimeError, ValueError) as exc:
            # RuntimeError: FAISS; OSError: the disk; ValueError: an encoder's bad output.
            self.metrics.failed_total += 1
            log.error("index build failed: %s", exc)
            return BuildOutcome("failed", reasons=(str(exc),), seconds=time.perf_counter() - t0)

    def _build(self, model: FrozenModel, snap: Any, key: tuple[object, int], trigger: str, t0: float) -> BuildOutcome:
        phases: dict[str, float] = {}
        t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            phases[name] = now - t
            t = now

        vectors = self._embed(model.encoder, snap.xs)
        lap("embed")
        xs, ys = self.held_out(model) if self.held_out is not None else ([], np.zeros(0))
        if not np.isfinite(vectors).all():
            decision = self.guardrail.check({"finite": False, "item_count": len(snap)}, None)
            return self._refused(decision, key, t0)
        queries = self._probe_queries(model.encoder, xs)
        lap("held_out")
        result = build_index(vectors, self.build_config, trained=self._trained, queries=queries)
        lap("index")
        auc = retrieval_auc(model.encoder, xs, ys)
        candidate = {"recall": result.recall, "auc": auc, "item_count": len(snap)}
        decision = self.guardrail.check(candidate, self._baseline(xs, ys))
        lap("guardrail")
        if not decision.accepted:
            return self._refused(decision, key, t0)
        manifest = self._manifest(model, result, auc, len(xs), trigger, phases["embed"], decision)
        manifest["items"] = {"covered_seq": int(getattr(snap, "items_seq", 0))}
        info = self.store.write_version(
            result.index, np.asarray(snap.ids, dtype=np.str_), manifest,
            trained=None if result.trained is None else result.trained.template,
            tower=model.checkpoint_bytes, hook=self.build_hook,
        )
        lap("write")
        self.store.publish(info.version)
        lap("publish")
        seconds = time.perf_counter() - t0
        if self.announcer is not None:
            self.announcer.announce(Announcement.for_version(info))
            lap("announce")
        self.store.retain()
        lap("retain")
        self._trained = result.trained
        self._served_encoder = (info.version, model.encoder)
        if self.retrieval is not None:
            self._measure_retrieval(model, result, vectors, snap.ids, xs, ys, info.version)
            lap("retrieval")
        self._done_key = key
        self._built_events = model.events_learned
        m = self.metrics
        m.builds_total += 1
        m.retrains_total += int(result.retrained)
        m.last_build_seconds = seconds
        m.last_recall = result.recall
        m.last_auc = math.nan if auc is None else auc
        m.index_version = info.version
        m.index_items = len(snap)
        m.last_publish_time = self.wall_clock()
        log.info("published index version %d: %d items, %s, recall@%d=%.3f, auc=%s, %.2f s (%s)",
                 info.version, len(snap), result.kind, result.recall_k, result.recall, auc, seconds, trigger)
        return BuildOutcome("published", version=info.version, seconds=seconds, manifest=info.manifest,
                            decision=decision, phases=phases)

    def _measure_retrieval(self, model: FrozenModel, result: BuildResult, vectors: np.ndarray,
                           ids: Sequence[str], xs: Sequence[X], ys: np.ndarray, version: int) -> None:
        try:
            report = self.retrieval(model.encoder, model.offsets, result.index, vectors, list(ids), xs, ys, version)
        except (TowerstreamError, RuntimeError, ValueError) as exc:  # a measurement never undoes a publish
            log.error("retrieval evaluation of version %d failed: %s", version, exc)
            return
        if not report.users:  # no held-out click (the learner caught up): the last measurement stands
            log.info("version %d: no held-out click to measure retrieval on; keeping version %s's",
                     version, (self.metrics.retrieval or {}).get("version"))
            return
        self.metrics.retrieval = report.as_dict()

    def _refused(self, decision: GuardrailDecision, key: tuple[object, int], t0: float) -> BuildOutcome:
        self._done_key = key  # the same inputs would be refused again
        self.metrics.refused_total += 1
        return BuildOutcome("refused", version=self.metrics.index_version, reasons=decision.reasons,
                            seconds=time.perf_counter() - t0, decision=decision)

    def _manifest(self, model: FrozenModel, result: BuildResult, auc: float | None, n_held_out: int,
                  trigger: str, embed_s: float, decision: GuardrailDecision) -> dict[str, Any]:
        return {
            "published_at": self.wall_clock(),
            "trigger": trigger,
            "checkpoint": {
                "path": model.source,
                "offsets": {t: {str(p): o for p, o in parts.items()} for t, parts in model.offsets.items()},
                "events_learned": model.events_learned,
                "created_at": model.created_at,
                "spec": model.spec,
            },
            "index": {"kind": result.kind, "params": dict(result.params)},
            "recall": {"value": result.recall, "lower_bound": result.extra.get("recall_lower_bound", result.recall),
                       "k": result.recall_k, "probe_queries": result.probe_count, "vs": "exact inner-product search"},
            "quality": {"auc": auc, "held_out_examples": n_held_out, "score": "<user_vec, item_vec>"},
            "build_seconds": {"embed": embed_s, **dict(result.seconds)},
            "retrained": result.retrained,
            "retrain_reason": result.retrain_reason,
            "drift": result.drift,
            "trained": None if result.trained is None else result.trained.meta(),
            "guardrail": {"baseline": decision.baseline},
        }
