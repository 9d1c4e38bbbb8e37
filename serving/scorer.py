"""Retrieve + pre-rank: the scorer core shared by the Kafka request loop and HTTP.

Per request (or per batch of requests)::

    model  = learner_source.current()        # one immutable ModelHandle
    handle = index_holder.current()          # one immutable index handle
    U      = model.learner.encode_users(user_xs)            # (B, D), L2-normalised
    ids    = handle.search(U, k_retrieve)                    # ANN top-K, one version
    score  = model.learner.score_candidates(user_x, item_xs) # pre-rank the K candidates
    -> Ranking(items sorted by score, index_version, model_version)

Both references are taken once, before any work, so every answer comes from exactly one
model version and one index version even while a checkpoint reload or an index swap
happens in another thread. A model is never updated in place: :class:`CheckpointLearnerSource`
loads a newer checkpoint into a fresh learner and then swaps one reference.

>>> import numpy as np
>>> class Learner:  # a toy two-tower: 2-d vectors, pre-rank score = item number
...     def encode_users(self, xs): return np.tile(np.float32([1, 0]), (len(xs), 1))
...     def score_candidates(self, user_x, item_xs):
...         return np.array([float(x["item_id"][1:]) for x in item_xs])
>>> from types import SimpleNamespace as NS
>>> class Handle:
...     def search(self, vecs, k):
...         return NS(ids=np.array([["i1", "i2", "i3"]]), scores=np.ones((1, 3)), version=3)
>>> holder = NS(current=Handle())
>>> s = Scorer(StaticLearnerSource(Learner(), name="toy", version="v1"), holder, k_retrieve=3)
>>> r = s.score(ScoreRequest(request_id="r1", user_id="u1", k=2))
>>> [(i.item_id, i.rank) for i in r.items], r.index_version, r.model_version
([('i3', 1), ('i2', 2)], 3, 'v1')
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from indexer.catalogue import Catalogue, item_x
from learners.base import USER_PREFIX
from serving.errors import BadRequestError, NotReadyError
from serving.metrics import Metrics
from streams.events import Event, FeatureValue

__all__ = [
    "ScoreRequest",
    "RankedItem",
    "Ranking",
    "ModelHandle",
    "LearnerSource",
    "StaticLearnerSource",
    "CheckpointLearnerSource",
    "prepare_before_serving",
    "IndexHolderLike",
    "ItemFeatureStore",
    "ItemSideCache",
    "Scorer",
    "user_x",
]

logger = logging.getLogger(__name__)

MAX_K = 10_000  # the event contract's bound on a request's k


def user_x(user_id: str, user_features: Mapping[str, FeatureValue] | None = None) -> dict[str, FeatureValue]:
    """The user example the user tower encodes (``learners.base`` layout, no item).

    >>> user_x("u1", {"age": "18-24"})
    {'user_id': 'u1', 'u:age': '18-24'}
    """
    x: dict[str, FeatureValue] = {"user_id": user_id}
    for name, value in (user_features or {}).items():
        x[USER_PREFIX + name] = value
    return x


@dataclass(frozen=True)
class ScoreRequest:
    """One request for ``k`` ranked candidates for a user.

    ``k=None`` means the scorer's default.
    """

    request_id: str
    user_id: str
    user_features: Mapping[str, FeatureValue] = field(default_factory=dict)
    k: int | None = None

    @classmethod
    def from_event(cls, event: Event) -> "ScoreRequest":
        """The request carried by a ``request`` event."""
        if event.kind != "request":
            raise BadRequestError(f"expected a request event, got a {event.kind} (event_id {event.event_id})")
        return cls(request_id=event.request_id, user_id=event.user_id, user_features=event.user_features, k=event.k)


@dataclass(frozen=True)
class RankedItem:
    """One candidate in a ranked list: ``rank`` is 1-based, ``score`` the pre-rank score,
    ``retrieval_score`` the ANN inner product that brought it in."""

    item_id: str
    score: float
    rank: int
    retrieval_score: float


@dataclass(frozen=True)
class Ranking:
    """The answer to one request: from one model version and one index version.

    ``latency_seconds`` is the scoring time of the batch the request was scored in;
    ``index_delta_seq`` the item-log sequence applied on top of ``index_version`` (item
    deltas, :mod:`indexer.delta`; 0: none), so ``(index_version, index_delta_seq)`` names
    exactly the catalogue the answer was retrieved from.
    """

    request_id: str
    user_id: str
    items: tuple[RankedItem, ...]
    index_version: Any
    model_version: Any
    learner: str
    latency_seconds: float
    index_delta_seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON record produced to the rankings topic and returned over HTTP."""
        return {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "items": [{"item_id": i.item_id, "score": i.score, "rank": i.rank} for i in self.items],
            "index_version": self.index_version,
            "index_delta_seq": self.index_delta_seq,
            "model_version": self.model_version,
            "learner": self.learner,
            "latency_seconds": self.latency_seconds,
        }


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """A fully loaded, never-mutated model and where it came from.

    Attributes
    ----------
    learner
        A two-tower learner: ``encode_users(xs) -> (B, D)``, ``score_candidates(user_x,
        item_xs) -> (K,)``, ``predict_proba_many(xs) -> (B,)``.
    name
        The learner's name (its spec name): the ``learner`` metric label.
    version
        The model version reported with each answer (e.g. events learned).
    created_at
        When the checkpoint was written (epoch seconds), for the freshness metric.
    path
        The checkpoint file, if any.
    """

    learner: Any
    name: str
    version: Any
    created_at: float | None = None
    path: Path | None = None


class LearnerSource(Protocol):
    """Where the scorer gets the current model: ``current()`` is cheap and never blocks
    on a load; it returns None until a model is available."""

    def current(self) -> ModelHandle | None: ...


class StaticLearnerSource:
    """A fixed in-memory learner (tests, benchmarks, a model trained in-process)."""

    def __init__(self, learner: Any, *, name: str | None = None, version: Any = 0,
                 created_at: float | None = None) -> None:
        spec = getattr(learner, "spec", None) or {}
        self.handle = ModelHandle(
            learner=learner, name=name or spec.get("name", type(learner).__name__), version=version,
            created_at=created_at,
        )

    def current(self) -> ModelHandle:
        return self.handle


def _default_loader(path: Path) -> ModelHandle:
    from learners.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return ModelHandle(
        learner=ckpt.learner(),
        name=str(ckpt.spec["name"]),
        version=int(ckpt.events_learned),
        created_at=float(ckpt.created_at),
        path=path,
    )


def prepare_before_serving(prepare: Callable[..., Any], model: ModelHandle, *args: Any) -> None:
    """Run ``prepare(model, *args)`` on a model about to serve; an exception is logged and
    the model serves unprepared (preparing is an optimisation, never a reason not to serve)."""
    try:
        prepare(model, *args)
    except Exception:
        logger.exception("preparing model %s version %s failed; serving it unprepared", model.name, model.version)


class CheckpointLearnerSource:
    """The latest learner checkpoint, reloaded when a newer one appears.

    Parameters
    ----------
    path
        A checkpoint file (reloaded when it is replaced), or a directory whose newest
        file matching ``pattern`` is taken.
    pattern
        Glob of checkpoint files inside a directory.
    loader
        ``Path -> ModelHandle``; the default reads it with ``learners.checkpoint``.
    poll_interval_s
        How often the background thread (:meth:`start`) looks for a newer file.
    on_load
        Called with each newly loaded handle (metrics, logs).
    prepare
        Called with each newly loaded handle *before* it serves (in the loading thread),
        e.g. :meth:`ItemSideCache.warm`: work a new model would otherwise do on the first
        requests it answers. An exception is logged and the handle serves anyway.

    A reload builds a complete new learner from the file, then swaps one reference:
    a request already holding the old handle finishes with the old model. A file that
    fails to load is logged and skipped; the previous model keeps serving.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        pattern: str = "*.ckpt",
        loader: Callable[[Path], ModelHandle] = _default_loader,
        poll_interval_s: float = 1.0,
        on_load: Callable[[ModelHandle], None] | None = None,
        prepare: Callable[[ModelHandle], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.pattern = pattern
        self.loader = loader
        self.poll_interval_s = poll_interval_s
        self.on_load = on_load
        self.prepare = prepare
        self._handle: ModelHandle | None = None
        self._loaded_key: tuple[str, int, int] | None = None
        self._failed_key: tuple[str, int, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def current(self) -> ModelHandle | None:
        return self._handle

    def _newest(self) -> tuple[Path, tuple[str, int, int]] | None:
        if self.path.is_dir():
            best: tuple[int, Path] | None = None
            for p in self.path.glob(self.pattern):
                try:
                    st = p.stat()
                except FileNotFoundError:  # removed by retention between glob and stat
                    continue
                if p.is_file() and (best is None or (st.st_mtime_ns, p.name) > (best[0], best[1].name)):
                    best = (st.st_mtime_ns, p)
            if best is None:
                return None
            path = best[1]
        elif self.path.is_file():
            path = self.path
        else:
            return None
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return path, (str(path), st.st_ino, st.st_mtime_ns)

    def refresh(self) -> bool:
        """Load the newest checkpoint if it is not the one being served. True if swapped."""
        with self._lock:
            found = self._newest()
            if found is None:
                if self._handle is None:
                    self.last_error = f"no checkpoint found at {self.path} (pattern {self.pattern})"
                return False
            path, key = found
            if key == self._loaded_key or key == self._failed_key:
                return False
            try:
                handle = self.loader(path)
            except Exception as exc:  # a bad file must not take serving down: keep the old model
                self._failed_key = key
                self.last_error = f"could not load checkpoint {path}: {exc}"
                logger.warning("%s; still serving %s", self.last_error,
                               None if self._handle is None else self._handle.version)
                return False
            if self.prepare is not None:
                prepare_before_serving(self.prepare, handle)
            self._handle = handle  # the one reference swap
            self._loaded_key = key
            self.last_error = None
        logger.info("loaded model %s version %s from %s", handle.name, handle.version, path)
        if self.on_load is not None:
            self.on_load(handle)
        return True

    def start(self) -> "CheckpointLearnerSource":
        """Load now, then poll for newer checkpoints from a daemon thread."""
        self.refresh()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-source", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except OSError as exc:
                logger.warning("checkpoint poll of %s failed: %s", self.path, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


class IndexHolderLike(Protocol):
    """What the scorer needs of :class:`indexer.handle.IndexHolder`: ``current``, the
    served immutable handle (or None), whose ``search(user_vecs (B, D), k)`` returns a
    result with ``ids`` (B, k) (``""`` padding), ``scores`` (B, k) and ``version``."""

    @property
    def current(self) -> Any: ...


def _index_handle(holder: Any) -> Any:
    return holder.current  # one reference read


class ItemFeatureStore:
    """Item id -> the item example the pre-ranker scores (``item_id`` + ``i:<feature>``).

    Fed from the events stream (every impression and click carries its item's
    features) and optionally a catalogue file (JSON lines, the indexer's format).
    Usable as the scorer's ``item_xs``. An unknown item is scored by its id alone.

    >>> store = ItemFeatureStore()
    >>> store.upsert("i1", {"cat": "c2"})
    >>> store(None, ["i1", "i9"])
    [{'item_id': 'i1', 'i:cat': 'c2'}, {'item_id': 'i9'}]
    """

    def __init__(self) -> None:
        self._xs: dict[str, dict[str, FeatureValue]] = {}
        self._revisions: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._xs)

    def upsert(self, item_id: str, features: Mapping[str, FeatureValue]) -> None:
        """Record an item's latest features (unprefixed names); the same features again
        change nothing (so a precomputed item side stays valid)."""
        self._put(item_id, item_x(item_id, features))

    def _put(self, item_id: str, x: dict[str, FeatureValue]) -> None:
        if self._xs.get(item_id) == x:
            return
        self._xs[item_id] = x  # one dict assignment: readers see old or new
        self._revisions[item_id] = self._revisions.get(item_id, 0) + 1

    def ids(self) -> list[str]:
        """Every item id known, in first-seen order."""
        return list(self._xs)

    def revision(self, item_id: str) -> int:
        """Bumped whenever the item's features change (0: never set)."""
        return self._revisions.get(item_id, 0)

    def observe_event(self, event: Event) -> None:
        """Take an impression's or click's item (requests carry none). An event without
        item features never erases features already known."""
        if event.item_id is not None and (event.item_features or event.item_id not in self._xs):
            self.upsert(event.item_id, event.item_features)

    def load_jsonl(self, path: str | Path) -> int:
        """Read a catalogue file (validated whole first); returns the records read."""
        cat = Catalogue()
        n = cat.load_jsonl(path)
        snap = cat.snapshot()
        for item_id, x in zip(snap.ids, snap.xs):
            self._put(item_id, dict(x))
        return n

    def __call__(self, handle: Any, ids: Sequence[str]) -> list[Mapping[str, FeatureValue]]:
        xs = self._xs
        return [xs.get(i) or {"item_id": i} for i in ids]


class _SideTable:
    """One model's item-side rows: preallocated tensors grown by doubling, never overwritten
    (a reader holding an older view stays valid), and ``rows``: item id -> (row, revision)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, int]] = {}
        self.n = 0
        self.vec: Any = None
        self.heads: Any = None
        self.bias: Any = None

    def append(self, side: Any) -> int:
        import torch

        start, m = self.n, len(side)
        cap = 0 if self.vec is None else self.vec.shape[0]
        if start + m > cap:  # grow by doubling; the old tensors stay valid for readers
            new = max(1024, 2 * cap, start + m)

            def grown(old: Any, part: Any) -> Any:
                if part is None:
                    return None
                buf = torch.empty((new, *part.shape[1:]), dtype=part.dtype)
                if old is not None and start:
                    buf[:start] = old[:start]
                return buf

            self.vec, self.heads, self.bias = (grown(self.vec, side.vec), grown(self.heads, side.heads),
                                               grown(self.bias, side.bias))
        self.vec[start:start + m] = side.vec
        if side.heads is not None:
            self.heads[start:start + m] = side.heads
        if side.bias is not None:
            self.bias[start:start + m] = side.bias
        self.n = start + m
        return start

    def add(self, ids: list[str], side: Any, revisions: list[int]) -> None:
        start = self.append(side)
        self.rows.update(zip(ids, zip(range(start, start + len(ids)), revisions)))

    def view(self) -> Any:
        from learners.two_tower.updater import ItemSide

        n = self.n
        return ItemSide(self.vec[:n], None if self.heads is None else self.heads[:n],
                        None if self.bias is None else self.bias[:n])


class ItemSideCache:
    """The item half of pre-ranking, computed once per (model, item, feature revision).

    A two-tower's pre-rank score of a candidate needs the item tower's output for it;
    it depends only on the model and the item's features, so the scorer keeps it as rows
    of preallocated tensors (:class:`learners.two_tower.updater.ItemSide`) per model
    handle and pre-ranks by row, touching no feature dict for a known item. An item whose
    features changed (``revision``) gets a new row. The tables of the ``keep`` newest
    models are kept (a request that took the previous model just before a reload still
    finds its rows). :meth:`warm` fills a new model's table for a whole catalogue before
    that model serves (``CheckpointLearnerSource(prepare=...)``), so a reload does not
    make its first requests compute the item tower for all their candidates.
    """

    def __init__(self, revision: Callable[[str], int] | None = None, keep: int = 2) -> None:
        self._revision = revision or (lambda _item: 0)
        self._lock = threading.Lock()
        self._tables: dict[int, tuple[object, _SideTable]] = {}  # id(model) -> (model, table), oldest first
        self.keep = max(1, int(keep))

    def __len__(self) -> int:
        """Rows of the newest model's table."""
        with self._lock:
            return next(reversed(self._tables.values()))[1].n if self._tables else 0

    def _table(self, model: object, table: _SideTable | None = None) -> _SideTable:
        hit = self._tables.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        table = table if table is not None else _SideTable()
        self._tables.pop(id(model), None)
        self._tables[id(model)] = (model, table)
        while len(self._tables) > self.keep:
            del self._tables[next(iter(self._tables))]
        return table

    def rows(self, model: object, ids: Sequence[str], compute: Callable[[list[str]], Any]) -> tuple[Any, np.ndarray]:
        """``(side, rows)``: a view of the precomputed rows and the row of each of ``ids``;
        ``compute(missing ids) -> ItemSide`` fills what the cache lacks for ``model``."""
        with self._lock:
            table = self._table(model)
            rev = self._revision
            got = table.rows
            missing = list(dict.fromkeys(i for i in ids if (hit := got.get(i)) is None or hit[1] != rev(i)))
            if missing:
                table.add(missing, compute(missing), [rev(i) for i in missing])
            out = np.fromiter((got[i][0] for i in ids), dtype=np.int64, count=len(ids))
            side = table.view()
        return side, out

    def warm(self, model: object, ids: Sequence[str], compute: Callable[[list[str]], Any],
             chunk: int = 4096) -> int:
        """Compute ``model``'s item side for ``ids`` (in chunks, outside the lock the request
        path takes) and install it as the model's table, unless requests already built one.
        Returns the rows computed."""
        table = _SideTable()
        ids = list(dict.fromkeys(ids))
        rev = self._revision
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            revisions = [rev(i) for i in part]  # read first: a change during compute shows as stale
            table.add(part, compute(part), revisions)
        with self._lock:
            hit = self._tables.get(id(model))
            if hit is None or hit[0] is not model:
                self._table(model, table)
        return table.n


class Scorer:
    """Retrieve top-``k_retrieve`` from the current index, pre-rank them, return the top ``k``.

    Parameters
    ----------
    learner_source
        Gives the current :class:`ModelHandle` (user tower + pre-ranker).
    index_holder
        Gives the current index handle (``current()``).
    k_retrieve
        ANN candidates fetched per request (K).
    k_default
        Items returned when a request does not say (``k=None``).
    item_xs
        ``(index handle, ids) -> list of item examples`` for the pre-ranker, e.g. an
        :class:`ItemFeatureStore`; the default asks the index handle (``handle.item_xs(ids)``)
        if it has that method, else scores ``{"item_id": id}``.
    metrics
        Where latencies are observed (``stage``: encode, retrieve, prerank, total).
    clock
        A monotonic clock in seconds.
    item_side_cache
        Precompute the item half of pre-ranking once per (model, item) for learners that
        offer it (``item_side`` / ``score_item_side``, the two-tower family); False scores
        every candidate from its feature dict each time.
    """

    def __init__(
        self,
        learner_source: LearnerSource,
        index_holder: IndexHolderLike,
        *,
        k_retrieve: int = 100,
        k_default: int = 10,
        item_xs: Callable[[Any, Sequence[str]], list[Mapping[str, FeatureValue]]] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        item_side_cache: bool = True,
    ) -> None:
        if k_retrieve < 1 or k_default < 1:
            raise ValueError(f"k_retrieve and k_default must be >= 1, got {k_retrieve} and {k_default}")
        self.learner_source = learner_source
        self.index_holder = index_holder
        self.k_retrieve = k_retrieve
        self.k_default = k_default
        self.item_xs = item_xs or _default_item_xs
        self.metrics = metrics
        self.clock = clock
        self.item_sides = (ItemSideCache(getattr(self.item_xs, "revision", None)) if item_side_cache else None)

    def prepare(self, model: ModelHandle, handle: Any = None) -> int:
        """Fill a newly loaded model's item-side cache for every item known (``item_xs.ids()``
        and the ids of index ``handle``, default the served one) before it serves: pass as
        ``CheckpointLearnerSource(prepare=...)``. Without it the first requests after each
        reload compute the item tower for all their candidates. Returns the rows computed
        (0 for a learner without an item side)."""
        learner = model.learner
        if self.item_sides is None or not (hasattr(learner, "item_side") and hasattr(learner, "score_item_side")):
            return 0
        handle = handle if handle is not None else _index_handle(self.index_holder)
        known = getattr(self.item_xs, "ids", None)
        ids = list(known()) if callable(known) else []
        served = getattr(handle, "ids", None)
        if served is not None:
            ids += served.tolist() if hasattr(served, "tolist") else list(served)
        if not ids:
            return 0
        return self.item_sides.warm(learner, ids, lambda part: learner.item_side(self.item_xs(handle, part)))

    def readiness(self) -> tuple[bool, str]:
        """``(ready, reason)``: ready when a model and an index are loaded."""
        missing = []
        if self.learner_source.current() is None:
            why = getattr(self.learner_source, "last_error", None)
            missing.append("no model loaded" + (f" ({why})" if why else ""))
        if _index_handle(self.index_holder) is None:
            missing.append("no index loaded")
        return (not missing, "; ".join(missing) or "ok")

    def _snapshot(self) -> tuple[ModelHandle, Any]:
        model = self.learner_source.current()
        handle = _index_handle(self.index_holder)
        if model is None or handle is None:
            raise NotReadyError(self.readiness()[1])
        return model, handle

    def score(self, request: ScoreRequest) -> Ranking:
        """Score one request."""
        return self.score_many([request])[0]

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[Ranking]:
        """Score a batch: one user-tower call and one ANN search for all of them.

        Every ranking of the batch comes from the same model and index version.
        """
        if not requests:
            return []
        for r in requests:
            if r.k is not None and not 1 <= r.k <= MAX_K:
                raise BadRequestError(f"k must be in 1..{MAX_K}, got {r.k} (request {r.request_id})")
        clock = self.clock
        t0 = clock()
        model, handle = self._snapshot()
        learner = model.learner
        uxs = [user_x(r.user_id, r.user_features) for r in requests]
        by_rows = self.item_sides is not None and hasattr(learner, "score_item_side")
        users = learner.user_side(uxs) if by_rows and hasattr(learner, "user_side") else None
        if users is not None:  # one user-tower pass serves retrieval and pre-ranking
            vecs = np.ascontiguousarray(users.vec.numpy(), dtype=np.float32)
        else:
            vecs = np.ascontiguousarray(learner.encode_users(uxs), dtype=np.float32)
        t1 = clock()
        k_ret = max(self.k_retrieve, max((r.k or self.k_default) for r in requests))
        found = handle.search(vecs, k_ret)
        ids, rscores = found.ids, found.scores
        t2 = clock()
        version = found.version
        delta_seq = int(getattr(found, "delta_seq", 0) or 0)
        ranked: list[tuple[ScoreRequest, list[RankedItem]]] = []
        cands = [_valid_candidates(ids[row], rscores[row]) for row in range(len(requests))]
        flat_pre = None
        if by_rows:
            # the item half precomputed and kept: one user-tower pass and one logit for the batch
            flat = [i for cand, _ in cands for i in cand]
            side, flat_rows = self.item_sides.rows(learner, flat, lambda miss: learner.item_side(
                self.item_xs(handle, miss)))
            sizes = [len(c) for c, _ in cands]
            bounds = np.cumsum([0] + sizes)
            flat_pre = np.asarray(learner.score_item_side(uxs if users is None else users, side, flat_rows,
                                                          np.repeat(np.arange(len(cands)), sizes)), dtype=np.float64)
        for row, (req, ux) in enumerate(zip(requests, uxs)):
            cand, cand_r = cands[row]
            if not cand:
                ranked.append((req, []))
                continue
            if flat_pre is not None:
                pre = flat_pre[bounds[row]:bounds[row + 1]]
            else:
                pre = np.asarray(learner.score_candidates(ux, self.item_xs(handle, cand)), dtype=np.float64)
            k = min(req.k or self.k_default, len(cand))
            top = np.argsort(-pre, kind="stable")[:k]
            pre_l = pre.tolist()
            ranked.append((req, [
                RankedItem(item_id=cand[j], score=pre_l[j], rank=n + 1, retrieval_score=cand_r[j])
                for n, j in enumerate(top.tolist())
            ]))
        t3 = clock()
        total = t3 - t0
        if self.metrics is not None:
            h = self.metrics.score_latency
            for stage, seconds in (("encode", t1 - t0), ("retrieve", t2 - t1), ("prerank", t3 - t2), ("total", total)):
                child = h.labels(stage=stage)
                for _ in requests:
                    child.observe(seconds)
        return [
            Ranking(request_id=req.request_id, user_id=req.user_id, items=tuple(items), index_version=version,
                    model_version=model.version, learner=model.name, latency_seconds=total,
                    index_delta_seq=delta_seq)
            for req, items in ranked
        ]


def _valid_candidates(ids: Any, scores: Any) -> tuple[list[str], list[float]]:
    """Drop FAISS's padding (``""`` ids from the index handle; ``None`` or a negative
    label elsewhere) from one result row, keeping the order.

    >>> _valid_candidates(np.array(["a", "", "b"]), np.array([0.9, -np.inf, 0.5]))
    (['a', 'b'], [0.9, 0.5])
    """
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "U":  # the index handle's rows: vectorised
        keep = ids != ""
        return ids[keep].tolist(), np.asarray(scores, dtype=np.float64)[keep].tolist()
    cand: list[str] = []
    cand_r: list[float] = []
    for i, s in zip(ids, scores):
        if i is None or (isinstance(i, (int, np.integer)) and i < 0) or i == "":
            continue
        cand.append(str(i))
        cand_r.append(float(s))
    return cand, cand_r


def _default_item_xs(handle: Any, ids: Sequence[str]) -> list[Mapping[str, FeatureValue]]:
    fn = getattr(handle, "item_xs", None)
    if callable(fn):
        return list(fn(ids))
    return [{"item_id": i} for i in ids]

