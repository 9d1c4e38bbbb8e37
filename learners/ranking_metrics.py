"""Retrieval metrics of ranked lists against held-out relevant items: Recall@K, HR@K, NDCG@K.

Each user has a ranked list of item ids (best first, no repeats) and a set of relevant
(held-out positive) items. For one user with relevant set R and top-K list L:

- Recall@K = |L ∩ R| / |R|
- HR@K (hit rate) = 1 when L ∩ R is non-empty, else 0
- NDCG@K = DCG / IDCG with binary gains, DCG = sum over hits at 0-based rank r of
  1 / log2(r + 2), IDCG the DCG of min(|R|, K) hits at the top.

Users with no relevant item are left out of every average (they have nothing to find);
:func:`retrieval_metrics` reports how many users were averaged. Ties in scores are the
ranker's business: these functions take the order they are given.

>>> recall_at_k([3, 1, 2], {1, 9}, 2), hit_rate_at_k([3, 1, 2], {1, 9}, 2)
(0.5, 1.0)
>>> round(ndcg_at_k([3, 1, 2], {1}, 3), 4)
0.6309
"""

from __future__ import annotations

import math
from typing import Any, Collection, Iterable, Mapping, Sequence

__all__ = ["recall_at_k", "hit_rate_at_k", "ndcg_at_k", "retrieval_metrics"]


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")


def recall_at_k(ranked: Sequence[Any], relevant: Collection[Any], k: int) -> float:
    """Share of ``relevant`` found in the first ``k`` of ``ranked`` (nan when ``relevant`` is empty)."""
    _check_k(k)
    if not relevant:
        return math.nan
    return sum(1 for item in ranked[:k] if item in relevant) / len(relevant)


def hit_rate_at_k(ranked: Sequence[Any], relevant: Collection[Any], k: int) -> float:
    """1.0 when any of the first ``k`` of ``ranked`` is relevant, else 0.0 (nan when ``relevant`` is empty)."""
    _check_k(k)
    if not relevant:
        return math.nan
    return float(any(item in relevant for item in ranked[:k]))


def ndcg_at_k(ranked: Sequence[Any], relevant: Collection[Any], k: int) -> float:
    """Binary-gain NDCG of the first ``k`` of ``ranked`` (nan when ``relevant`` is empty)."""
    _check_k(k)
    if not relevant:
        return math.nan
    dcg = sum(1.0 / math.log2(r + 2) for r, item in enumerate(ranked[:k]) if item in relevant)
    idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(relevant), k)))
    return dcg / idcg


def retrieval_metrics(
    ranked: Iterable[Sequence[Any]],
    relevant: Iterable[Collection[Any]],
    ks: Sequence[int] = (10, 50, 100),
) -> Mapping[str, float]:
    """Mean Recall@K, HR@K and NDCG@K over the users that have a relevant item.

    Parameters
    ----------
    ranked
        One ranked list per user (best first).
    relevant
        One set of relevant items per user, in the same order.
    ks
        The cut-offs.

    Returns
    -------
    Mapping[str, float]
        ``recall@K``, ``hr@K``, ``ndcg@K`` for each K, and ``users`` (how many users
        were averaged; the metrics are nan when it is 0).
    """
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "hr", "ndcg")}
    users = 0
    for lst, rel in zip(ranked, relevant, strict=True):
        if not rel:
            continue
        users += 1
        for k in ks:
            sums[f"recall@{k}"] += recall_at_k(lst, rel, k)
            sums[f"hr@{k}"] += hit_rate_at_k(lst, rel, k)
            sums[f"ndcg@{k}"] += ndcg_at_k(lst, rel, k)
    out = {key: (v / users if users else math.nan) for key, v in sums.items()}
    out["users"] = float(users)
    return out
