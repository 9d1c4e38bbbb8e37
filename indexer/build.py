"""Choose and build a FAISS index over L2-normalised item vectors (inner product).

The choice (see ``benchmarks/bench_index.py`` for the numbers behind it):

* ``flat`` (exact) below ``flat_threshold`` items: no training, recall 1, and an exact
  scan of a few tens of thousands of 64-d vectors costs well under a millisecond.
* ``ivf_flat`` beyond: spherical k-means centroids (``nlist`` ~ sqrt(N), a power of
  two), full vectors in the lists, so recall is limited only by ``nprobe``. Training
  runs on a sample and is cheap; adding 1M vectors is a few seconds on 2 cores.
* ``ivf_pq`` is available where memory matters more than recall; ``hnsw`` is
  buildable for comparison but never chosen automatically: its build is two orders of
  magnitude slower than IVF at 1M items, and the index is rebuilt every period.

Centroids are reused between builds (the trained, empty index travels as a
:class:`TrainedState`); they are retrained every ``retrain_every`` builds, when the
catalogue has grown by ``growth_retrain`` times, or when the vectors drifted: the mean
quantisation error ``1 - max_c <x, c>`` of the new vectors exceeds the error measured
at training time by more than ``drift_threshold`` (relative).

``nprobe`` (or HNSW ``efSearch``) is the smallest value whose recall@K against exact
search on a probe set of queries reaches ``recall_target``, with confidence: the lower
bound ``mean - 1.645 * stderr`` of the per-query recalls must reach it, so the target
also holds on queries the build never saw. For IVF-Flat the whole recall-vs-nprobe
curve is predicted from one coarse search (:func:`ivf_recall_curve`) and the chosen
value is then confirmed by a real search.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> v = rng.normal(size=(500, 8)).astype("float32")
>>> v /= np.linalg.norm(v, axis=1, keepdims=True)
>>> r = build_index(v, BuildConfig(recall_k=10))
>>> r.kind, r.index.ntotal, r.recall
('flat', 500, 1.0)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

import faiss
import numpy as np

from indexer.errors import BuildError

__all__ = [
    "IndexKind",
    "BuildConfig",
    "TrainedState",
    "BuildResult",
    "build_index",
    "choose_kind",
    "default_nlist",
    "recall_at_k",
    "exact_topk",
    "quantisation_error",
    "ivf_recall_curve",
    "per_query_recall",
]

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"]
_IVF_KINDS = ("ivf_flat", "ivf_pq")


@dataclass(frozen=True)
class BuildConfig:
    """How to build an index. Every field is stored under its own name.

    Parameters
    ----------
    kind
        ``"auto"`` (flat below ``flat_threshold``, ``ivf`` beyond) or a fixed kind.
    flat_threshold
        Item count below which ``auto`` builds an exact flat index.
    ivf
        Which IVF variant ``auto`` uses beyond the threshold.
    nlist
        IVF lists; None: :func:`default_nlist` of the item count.
    train_points_per_list
        Training sample size per list (the sample is at most N vectors).
    kmeans_iters
        k-means iterations at training.
    pq_m, pq_nbits
        Product quantiser sub-vectors and bits (``ivf_pq`` only).
    pq_refine
        ``ivf_pq`` only: re-rank ``pq_refine * k`` PQ candidates with exact vectors
        (0 disables; enabling it keeps the full vectors in memory).
    hnsw_m, hnsw_ef_construction
        HNSW graph degree and build beam (``hnsw`` only).
    recall_k, recall_target
        The recall@K the search parameter is tuned for.
    recall_confidence_z
        The target must hold for the lower confidence bound ``mean - z * stderr`` of the
        per-query recalls on the probe set (1.645: one-sided 95 %), so that it also holds
        on queries the build never saw; 0 tunes on the probe mean.
    probe_queries
        Queries sampled for tuning when the caller passes none.
    retrain_every
        Retrain the centroids at least every this many builds (1: every build).
    growth_retrain
        Retrain when the item count grew by this factor since training.
    drift_threshold
        Retrain when the relative increase of the quantisation error exceeds this.
    seed
        Seed of the training and probe samples.
    """

    kind: IndexKind = "auto"
    flat_threshold: int = 50_000
    ivf: Literal["ivf_flat", "ivf_pq"] = "ivf_flat"
    nlist: int | None = None
    train_points_per_list: int = 64
    kmeans_iters: int = 10
    pq_m: int = 16
    pq_nbits: int = 8
    pq_refine: int = 4
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    recall_k: int = 100
    recall_target: float = 0.95
    recall_confidence_z: float = 1.645
    probe_queries: int = 200
    retrain_every: int = 10
    growth_retrain: float = 2.0
    drift_threshold: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw"):
            raise BuildError(f"unknown index kind {self.kind!r}; use auto, flat, ivf_flat, ivf_pq or hnsw")
        if not 0.0 < self.recall_target <= 1.0:
            raise BuildError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.recall_k < 1 or self.retrain_every < 1 or self.probe_queries < 1:
            raise BuildError("recall_k, retrain_every and probe_queries must be >= 1")


@dataclass(frozen=True)
class TrainedState:
    """Trained, empty IVF index (serialised) plus what is needed to judge its freshness.

    Attributes
    ----------
    template
        ``faiss.serialize_index`` of the trained index with no vectors.
    kind, dim, nlist
        What the template is; a build with other values retrains.
    trained_count
        Item count when it was trained.
    train_error
        Mean quantisation error of the training vectors (``1 - max_c <x, c>``).
    builds_since_train
        Builds that reused it since training (0 for the build that trained it).
    """

    template: bytes
    kind: str
    dim: int
    nlist: int
    trained_count: int
    train_error: float
    builds_since_train: int = 0

    def instantiate(self) -> faiss.Index:
        """A fresh copy of the trained empty index."""
        return faiss.deserialize_index(np.frombuffer(self.template, dtype=np.uint8))

    def meta(self) -> dict[str, Any]:
        """JSON-ready description (without the template bytes), for the manifest."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "nlist": self.nlist,
            "trained_count": self.trained_count,
            "train_error": self.train_error,
            "builds_since_train": self.builds_since_train,
        }


@dataclass(frozen=True, eq=False)
class BuildResult:
    """A built index and how it was built.

    Attributes
    ----------
    index
        The FAISS index; row ``i`` of the input vectors has label ``i``. Search
        parameters (``nprobe``/``efSearch``) are already set.
    kind
        ``flat``, ``ivf_flat``, ``ivf_pq`` or ``hnsw``.
    params
        Index parameters (nlist, nprobe, efSearch, ...), JSON-ready.
    recall
        Recall@``recall_k`` against exact search on the probe queries.
    recall_k, probe_count
        K and the number of probe queries.
    seconds
        Timings: ``train``, ``add``, ``tune``, ``total``.
    trained
        The reusable training state (IVF kinds), else None.
    retrained, retrain_reason
        Whether this build trained centroids, and why.
    drift
        Relative increase of the quantisation error vs training (IVF kinds, when reused).
    """

    index: faiss.Index
    kind: str
    params: Mapping[str, Any]
    recall: float
    recall_k: int
    probe_count: int
    seconds: Mapping[str, float]
    trained: TrainedState | None = None
    retrained: bool = False
    retrain_reason: str | None = None
    drift: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` items: the power of two nearest ``sqrt(n)``, in [16, 65536].

    >>> default_nlist(1_000_000), default_nlist(100_000), default_nlist(10)
    (1024, 256, 16)
    """
    if n <= 0:
        return 16
    p = round(math.log2(math.sqrt(n)))
    return int(min(65536, max(16, 2**p)))


def choose_kind(n: int, config: BuildConfig) -> str:
    """The index kind for ``n`` items under ``config``.

    >>> choose_kind(10_000, BuildConfig()), choose_kind(200_000, BuildConfig())
    ('flat', 'ivf_flat')
    """
    if config.kind != "auto":
        return config.kind
    return "flat" if n < config.flat_threshold else config.ivf


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Labels of the exact inner-product top-``k``, shape (Q, k)."""
    _, labels = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
    return labels


def per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Recall of each query, shape (Q,).

    >>> per_query_recall(np.array([[1, 2], [3, 4]]), np.array([[1, 5], [3, 4]])).tolist()
    [0.5, 1.0]
    """
    out = np.empty(len(truth))
    for q, (f, t) in enumerate(zip(found, truth)):
        out[q] = len(set(f[f >= 0].tolist()) & set(t.tolist())) / max(len(t), 1)
    return out


def lower_bound(recalls: np.ndarray, z: float) -> float:
    """``mean - z * stderr`` of per-query recalls (the mean when there is one query)."""
    if len(recalls) < 2 or z <= 0:
        return float(np.mean(recalls)) if len(recalls) else 1.0
    return float(np.mean(recalls) - z * np.std(recalls, ddof=1) / np.sqrt(len(recalls)))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of ``|found ∩ truth| / |truth|`` (``-1`` labels never match).

    >>> recall_at_k(np.array([[1, 2, -1]]), np.array([[2, 3, 1]]))
    0.6666666666666666
    """
    if truth.size == 0:
        return 1.0
    hits = 0
    for f, t in zip(found, truth):
        hits += len(set(f[f >= 0].tolist()) & set(t.tolist()))
    return hits / truth.size


def quantisation_error(quantizer_centroids: np.ndarray, sample: np.ndarray) -> float:
    """Mean ``1 - max_c <x, c>`` of ``sample`` against normalised centroids."""
    sims, _ = faiss.knn(sample, quantizer_centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)
    return float(np.mean(1.0 - sims[:, 0]))


def _check_vectors(vectors: np.ndarray) -> np.ndarray:
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise BuildError(f"vectors must have shape (N, D) with N, D > 0, got {vectors.shape}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise BuildError("vectors contain NaN or infinite values; check the item tower's checkpoint")
    return vectors


def _centroids(index: faiss.Index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def _train(kind: str, vectors: np.ndarray, nlist: int, config: BuildConfig) -> TrainedState:
    n, d = vectors.shape
    rng = np.random.default_rng(config.seed)
    size = nlist * config.train_points_per_list
    if kind == "ivf_pq":
        size = max(size, 32 * 2**config.pq_nbits)  # enough points for the PQ codebooks
    size = min(n, size)
    sample = vectors[np.sort(rng.choice(n, size=size, replace=False))] if size < n else vectors
    kmeans = faiss.Kmeans(
        d, nlist, niter=config.kmeans_iters, spherical=True, seed=config.seed,
        max_points_per_centroid=config.train_points_per_list * 4,
    )
    kmeans.train(sample)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(kmeans.centroids)
    if kind == "ivf_flat":
        index: faiss.Index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
    else:
        if d % config.pq_m:
            raise BuildError(f"pq_m={config.pq_m} must divide the vector dimension {d}")
        ivfpq = faiss.IndexIVFPQ(quantizer, d, nlist, config.pq_m, config.pq_nbits, faiss.METRIC_INNER_PRODUCT)
        ivfpq.pq.cp.niter = config.kmeans_iters
        ivfpq.pq.cp.min_points_per_centroid = 16
        # The coarse quantizer is already trained: only the PQ codebooks learn here.
        ivfpq.train(sample)
        index = faiss.IndexRefineFlat(ivfpq) if config.pq_refine > 0 else ivfpq
        if config.pq_refine > 0:
            index.k_factor = float(config.pq_refine)
    template = bytes(faiss.serialize_index(index))
    return TrainedState(
        template=template,
        kind=kind,
        dim=d,
        nlist=nlist,
        trained_count=n,
        # Measured on a fresh sample: the training sample's own error is optimistic (the
        # centroids were fitted to it), and the drift check compares against fresh samples.
        train_error=quantisation_error(kmeans.centroids, _drift_sample(vectors, nlist, config.seed + 1)),
    )


def _drift_sample(vectors: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """The vectors the quantisation error is measured on (at training and at each reuse)."""
    n = len(vectors)
    size = min(n, max(1000, nlist * 4))
    if size == n:
        return vectors
    return vectors[np.random.default_rng(seed).choice(n, size=size, replace=False)]


def _retrain_reason(
    kind: str, vectors: np.ndarray, nlist: int, trained: TrainedState | None, config: BuildConfig
) -> tuple[str | None, float | None]:
    """Why the centroids must be (re)trained, or None to reuse them; plus the drift."""
    n, d = vectors.shape
    if trained is None:
        return "no trained centroids", None
    if (trained.kind, trained.dim) != (kind, d):
        return f"index changed from {trained.kind}/{trained.dim}d to {kind}/{d}d", None
    if config.nlist is not None and trained.nlist != config.nlist:
        return f"nlist changed from {trained.nlist} to {config.nlist}", None
    if trained.builds_since_train + 1 >= config.retrain_every:
        return f"periodic retrain (every {config.retrain_every} builds)", None
    if n > config.growth_retrain * trained.trained_count:
        return f"catalogue grew from {trained.trained_count} to {n} items", None
    centroids = _centroids(trained.instantiate())
    error = quantisation_error(centroids, _drift_sample(vectors, trained.nlist, config.seed + 1))
    drift = error / max(trained.train_error, 1e-12) - 1.0
    if drift > config.drift_threshold:
        return f"vectors drifted: quantisation error +{drift:.0%} since training", drift
    return None, drift


def ivf_recall_curve(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                     upper: int) -> np.ndarray:
    """Per-query recall@K of an IVF index for every nprobe in 1..upper, from one coarse search.

    A true neighbour is scanned at ``nprobe = p`` iff the list it was added to (its
    nearest centroid) is among the query's ``p`` nearest centroids; once scanned, an
    exact (IVF-Flat) neighbour of the whole catalogue is also a top-K of the scanned
    subset. So a query's ``recall(p)`` = the share of its true neighbours whose list
    ranks below p. Exact for IVF-Flat (up to score ties); an upper bound for IVF-PQ.

    Returns ``curves`` of shape (Q, upper) with ``curves[q, p - 1]`` = recall of query q
    at ``nprobe = p``.
    """
    ivf = faiss.extract_index_ivf(index)
    n_q, k = truth.shape
    _, coarse = ivf.quantizer.search(queries, upper)  # (Q, upper) list ids, nearest first
    rank = np.full((n_q, ivf.nlist), upper, dtype=np.int64)
    rows = np.repeat(np.arange(n_q), upper)
    valid = coarse.ravel() >= 0
    rank[rows[valid], coarse.ravel()[valid]] = np.tile(np.arange(upper), n_q)[valid]
    flat_truth = truth.ravel()
    found = flat_truth >= 0
    lists = np.full(flat_truth.shape, -1, dtype=np.int64)
    lists[found] = ivf.quantizer.assign(np.ascontiguousarray(vectors[flat_truth[found]]), 1).ravel()
    list_rank = np.where(found, rank[np.repeat(np.arange(n_q), k), np.maximum(lists, 0)], upper).reshape(n_q, k)
    list_rank.sort(axis=1)
    probes = np.arange(1, upper + 1)
    return np.stack([np.searchsorted(r, probes, side="left") for r in list_rank]) / max(k, 1)


def _tune(
    index: faiss.Index, kind: str, queries: np.ndarray, truth: np.ndarray, k: int, config: BuildConfig,
    upper: int, start: int = 1,
) -> tuple[int, float, float]:
    """Smallest nprobe/efSearch in [start, upper] whose probe recall lower bound reaches
    the target (or upper), by searching: doubling, then bisection. Recall is measured,
    not predicted. Returns (value, mean recall, lower bound)."""

    def set_param(value: int) -> None:
        if kind == "hnsw":
            index.hnsw.efSearch = value
        else:
            faiss.extract_index_ivf(index).nprobe = value

    def measure(value: int) -> tuple[float, float]:
        set_param(value)
        _, labels = index.search(queries, k)
        per_query = per_query_recall(labels, truth)
        return float(per_query.mean()), lower_bound(per_query, config.recall_confidence_z)

    cache: dict[int, tuple[float, float]] = {}
    lo, value = start - 1, start
    while True:
        value = min(value, upper)
        cache[value] = measure(value)
        if cache[value][1] >= config.recall_target or value == upper:
            break
        lo, value = value, value * 2
    hi = value
    if cache[hi][1] >= config.recall_target:
        # Bisection between the last value that failed and hi.
        while hi - lo > 1:
            mid = (lo + hi) // 2
            cache[mid] = measure(mid)
            if cache[mid][1] >= config.recall_target:
                hi = mid
            else:
                lo = mid
    set_param(hi)
    return hi, cache[hi][0], cache[hi][1]


def build_index(
    vectors: np.ndarray,
    config: BuildConfig = BuildConfig(),
    *,
    trained: TrainedState | None = None,
    queries: np.ndarray | None = None,
) -> BuildResult:
    """Build an index over ``vectors`` (N, D) float32, L2-normalised.

    Parameters
    ----------
    vectors
        Item vectors, shape (N, D); row ``i`` gets label ``i``.
    config
        The build settings.
    trained
        The previous build's :class:`TrainedState`, reused unless a retrain is due.
    queries
        Probe queries (Q, D) for tuning and recall, ideally user vectors; None samples
        ``config.probe_queries`` of the item vectors.
    """
    t0 = time.perf_counter()
    vectors = _check_vectors(vectors)
    n, d = vectors.shape
    kind = choose_kind(n, config)
    k = min(config.recall_k, n)
    if queries is None:
        rng = np.random.default_rng(config.seed + 2)
        queries = vectors[rng.choice(n, size=min(n, config.probe_queries), replace=False)]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != d:
        raise BuildError(f"probe queries must have shape (Q, {d}), got {queries.shape}")
    seconds: dict[str, float] = {"train": 0.0}
    state: TrainedState | None = None
    retrained, reason, drift = False, None, None
    params: dict[str, Any] = {"dim": d, "metric": "inner_product"}

    if kind == "flat":
        t = time.perf_counter()
        index: faiss.Index = faiss.IndexFlatIP(d)
        index.add(vectors)
        seconds["add"] = time.perf_counter() - t
        seconds["tune"] = 0.0
        seconds["total"] = time.perf_counter() - t0
        return BuildResult(index, kind, params, 1.0, k, len(queries), seconds)

    if kind in _IVF_KINDS:
        nlist = config.nlist or default_nlist(n)
        if trained is not None and config.nlist is None and (trained.kind, trained.dim) == (kind, d):
            nlist = trained.nlist  # keep the trained list count until a retrain
        reason, drift = _retrain_reason(kind, vectors, nlist, trained, config)
        t = time.perf_counter()
        if reason is not None:
            nlist = config.nlist or default_nlist(n)
            if nlist > n:
                raise BuildError(f"nlist={nlist} exceeds the {n} items; use a flat index or a smaller nlist")
            log.info("training %s centroids (nlist=%d): %s", kind, nlist, reason)
            state = _train(kind, vectors, nlist, config)
            retrained = True
        else:
            assert trained is not None
            state = replace(trained, builds_since_train=trained.builds_since_train + 1)
        seconds["train"] = time.perf_counter() - t
        t = time.perf_counter()
        index = state.instantiate()
        index.add(vectors)
        seconds["add"] = time.perf_counter() - t
        params.update(nlist=state.nlist)
        if kind == "ivf_pq":
            params.update(pq_m=config.pq_m, pq_nbits=config.pq_nbits, pq_refine=config.pq_refine)
        upper = state.nlist
    elif kind == "hnsw":
        t = time.perf_counter()
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.add(vectors)
        seconds["add"] = time.perf_counter() - t
        params.update(hnsw_m=config.hnsw_m, ef_construction=config.hnsw_ef_construction)
        upper = max(4096, k)
    else:  # pragma: no cover - guarded by BuildConfig
        raise BuildError(f"unknown index kind {kind!r}")

    t = time.perf_counter()
    truth = exact_topk(queries, vectors, k)
    start = k if kind == "hnsw" else 1
    if kind in _IVF_KINDS:
        # Predict the smallest nprobe from one coarse search, then confirm it by searching.
        curves = ivf_recall_curve(index, vectors, queries, truth, upper)
        bounds = np.array([lower_bound(curves[:, p], config.recall_confidence_z) for p in range(upper)])
        reached = np.flatnonzero(bounds >= config.recall_target)
        start = int(reached[0]) + 1 if len(reached) else upper
    value, recall, bound = _tune(index, kind, queries, truth, k, config, upper, start=start)
    seconds["tune"] = time.perf_counter() - t
    params["efSearch" if kind == "hnsw" else "nprobe"] = value
    if bound < config.recall_target:
        log.warning("%s reached recall@%d=%.3f (lower bound %.3f) < target %.3f at the largest setting",
                    kind, k, recall, bound, config.recall_target)
    seconds["total"] = time.perf_counter() - t0
    return BuildResult(
        index, kind, params, recall, k, len(queries), seconds,
        trained=state, retrained=retrained, retrain_reason=reason, drift=drift,
        extra={"recall_lower_bound": bound},
    )


def apply_search_params(index: faiss.Index, params: Mapping[str, Any]) -> None:
    """Set ``nprobe``/``efSearch`` from manifest params on a freshly loaded index."""
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
