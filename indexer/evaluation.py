"""Retrieval quality of a published index on the latest window of clicks.

For every user with at least one click in the held-out window (impressions the frozen
checkpoint has not learned from), the user tower embeds the user and three rankers
produce a top-K list over the indexed items:

* ``served``: the published FAISS index with its search parameters (the ANN answer);
* ``flat``: exact inner-product search over the same item vectors, so the ANN loss shows
  apart from the model's (for a flat index the two are the same by construction);
* ``popularity``: items by click count on the impressions the checkpoint *did* learn
  (the part of the window before its offsets), the same list for every user.

Recall@K, HR@K and NDCG@K (:mod:`learners.ranking_metrics`) average over those users;
the held-out clicks of a user are its relevant set. Already-seen items are not removed
from the lists. Ties: exact search and popularity break ties by item position in the
index ascending (deterministic); the served index's order is FAISS's.

>>> scores = np.array([[0.5, 0.9, 0.5, 0.1]], dtype=np.float32)
>>> topk_by_score(scores, 3).tolist()
[[1, 0, 2]]
>>> popularity_order({"b": 3, "a": 3, "c": 5}, ["a", "b", "c", "d"], 4).tolist()
[2, 0, 1, 3]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import faiss
import numpy as np

from indexer.errors import IndexerError
from learners.base import X
from learners.ranking_metrics import retrieval_metrics

__all__ = [
    "RetrievalReport",
    "RetrievalEvaluator",
    "topk_by_score",
    "popularity_order",
    "clicks_by_user",
    "evaluate_retrieval",
]

log = logging.getLogger(__name__)

SEARCHES: tuple[str, ...] = ("served", "flat", "popularity")


def topk_by_score(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores per row; ties go to the lower index.

    ``scores`` is (Q, N); the result is (Q, min(k, N)).

    >>> topk_by_score(np.array([[1.0, 1.0, 2.0]]), 2).tolist()
    [[2, 0]]
    """
    if k < 1:
        raise IndexerError(f"k must be >= 1, got {k}")
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def popularity_order(counts: Mapping[str, int], ids: Sequence[str], k: int) -> np.ndarray:
    """Positions in ``ids`` of the ``k`` most clicked items; ties to the lower position."""
    c = np.array([counts.get(str(i), 0) for i in ids], dtype=np.float64)
    return topk_by_score(c[None, :], k)[0]


def clicks_by_user(xs: Sequence[X], ys: np.ndarray) -> tuple[list[X], list[set[str]]]:
    """One example per user that clicked in ``(xs, ys)`` and the set of items it clicked.

    Users are in order of first click.

    >>> xs = [{"user_id": "u", "item_id": "a"}, {"user_id": "v", "item_id": "b"},
    ...       {"user_id": "u", "item_id": "c"}]
    >>> users, rel = clicks_by_user(xs, np.array([1, 0, 1]))
    >>> [x["user_id"] for x in users], [sorted(r) for r in rel]
    (['u'], [['a', 'c']])
    """
    if len(xs) != len(ys):
        raise IndexerError(f"{len(xs)} examples but {len(ys)} labels: pass one label per example")
    first: dict[Any, X] = {}
    rel: dict[Any, set[str]] = {}
    for x, y in zip(xs, ys):
        if int(y) != 1:
            continue
        u = x.get("user_id")
        first.setdefault(u, x)
        rel.setdefault(u, set()).add(str(x.get("item_id")))
    return list(first.values()), [rel[u] for u in first]


@dataclass(frozen=True)
class RetrievalReport:
    """Retrieval metrics of one index version.

    ``metrics[search]`` maps ``recall@K`` / ``hr@K`` / ``ndcg@K`` to the mean over
    ``users`` users, for ``search`` in ``served``, ``flat``, ``popularity`` (the last
    missing when no click counts were at hand).
    """

    version: int | None
    users: int
    ks: tuple[int, ...]
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "users": self.users, "ks": list(self.ks),
                "metrics": {s: dict(m) for s, m in self.metrics.items()}}


def _labels_to_ids(labels: np.ndarray, ids: Sequence[str]) -> list[list[str]]:
    return [[str(ids[j]) for j in row if j >= 0] for row in labels]


def evaluate_retrieval(
    users: np.ndarray,
    relevant: Sequence[set[str]],
    vectors: np.ndarray,
    ids: Sequence[str],
    *,
    index: faiss.Index | None = None,
    popularity: Mapping[str, int] | None = None,
    ks: Sequence[int] = (10, 50, 100),
    version: int | None = None,
) -> RetrievalReport:
    """Metrics of the served index, exact search and popularity for the given users.

    Parameters
    ----------
    users
        (U, D) user vectors, one per user with a relevant item.
    relevant
        The relevant (held-out clicked) item ids of each user.
    vectors, ids
        The indexed item vectors (N, D) and their ids; row ``i`` has FAISS label ``i``.
    index
        The served index (None: left out).
    popularity
        Click counts per item id (None: left out).
    ks
        The cut-offs.
    version
        Recorded in the report.
    """
    users = np.ascontiguousarray(users, dtype=np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(users) != len(relevant):
        raise IndexerError(f"{len(users)} user vectors but {len(relevant)} relevant sets: one per user")
    if len(vectors) != len(ids):
        raise IndexerError(f"{len(vectors)} item vectors but {len(ids)} ids: one id per vector")
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise IndexerError(f"ks must be positive cut-offs, got {ks}")
    out: dict[str, Mapping[str, float]] = {}
    if len(users) == 0 or len(vectors) == 0:
        return RetrievalReport(version=version, users=0, ks=ks)
    kmax = min(ks[-1], len(vectors))
    flat = topk_by_score(users @ vectors.T, kmax)
    lists = {"flat": _labels_to_ids(flat, ids)}
    if index is not None:
        _, labels = index.search(users, kmax)
        lists["served"] = _labels_to_ids(labels, ids)
    if popularity is not None:
        pop = [str(ids[j]) for j in popularity_order(popularity, ids, kmax)]
        lists["popularity"] = [pop] * len(users)
    n = 0
    for name in SEARCHES:
        if name in lists:
            m = dict(retrieval_metrics(lists[name], relevant, ks))
            n = int(m.pop("users"))
            out[name] = m
    return RetrievalReport(version=version, users=n, ks=ks, metrics=out)


class RetrievalEvaluator:
    """The indexer service's hook: evaluates each published version on the held-out clicks.

    Parameters
    ----------
    ks
        The cut-offs.
    max_users
        Most users evaluated (the first to click in the window).
    popularity
        ``popularity(offsets) -> {item_id: clicks}`` over what a checkpoint with those
        offsets learned (e.g. :meth:`indexer.follow.RecentWindow.learned_clicks`); None:
        no popularity baseline.
    """

    def __init__(self, ks: Sequence[int] = (10, 50, 100), *, max_users: int = 2000,
                 popularity: Callable[[Mapping[str, Mapping[int, int]]], Mapping[str, int]] | None = None) -> None:
        if max_users < 1:
            raise IndexerError(f"max_users must be >= 1, got {max_users}")
        self.ks = tuple(ks)
        self.max_users = max_users
        self.popularity = popularity

    def __repr__(self) -> str:
        return f"RetrievalEvaluator(ks={self.ks}, max_users={self.max_users})"

    def __call__(self, encoder: Any, offsets: Mapping[str, Mapping[int, int]], index: faiss.Index,
                 vectors: np.ndarray, ids: Sequence[str], xs: Sequence[X], ys: np.ndarray,
                 version: int | None = None) -> RetrievalReport:
        user_xs, relevant = clicks_by_user(xs, ys)
        user_xs, relevant = user_xs[: self.max_users], relevant[: self.max_users]
        if not user_xs:
            return RetrievalReport(version=version, users=0, ks=tuple(sorted(set(self.ks))))
        users = np.asarray(encoder.encode_users(user_xs), dtype=np.float32)
        pop = self.popularity(offsets) if self.popularity is not None else None
        return evaluate_retrieval(users, relevant, vectors, ids, index=index, popularity=pop,
                                  ks=self.ks, version=version)
