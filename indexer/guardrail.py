"""Publish only builds that are not worse than the served one.

A candidate build is judged by numbers measured at build time:

* ``recall`` — recall@K of the ANN index against exact search on the probe queries;
  must reach ``min_recall`` and not fall more than ``max_recall_drop`` below the served
  version's.
* ``auc`` — the offline quality check: ROC AUC of the model's retrieval score
  ``<user_vec, item_vec>`` on a recent held-out window of labelled impressions (events
  the checkpoint has not learned from). It must not fall more than ``max_auc_drop``
  below the served model's AUC *on the same window* (or, when that model is not at
  hand, the AUC recorded in the served manifest), nor below ``min_auc`` if set.
* ``finite`` — item vectors with NaN or infinities are refused outright.
* ``item_count`` — refuses a build that lost more than ``max_item_loss`` of the served
  items (an empty or truncated catalogue).

Refusals are logged with their reasons and counted (:attr:`Guardrail.refused_total`,
:attr:`Guardrail.refusals`).

>>> g = Guardrail(GuardrailConfig(max_auc_drop=0.02))
>>> g.check({"recall": 0.97, "auc": 0.70, "item_count": 100},
...         {"recall": 0.97, "auc": 0.75, "item_count": 100}).reasons
('auc 0.700 is 0.050 below the served 0.750 (allowed drop 0.020)',)
>>> g.refused_total
1
>>> roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
0.75
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from learners.metrics import roc_auc as _roc_auc

from learners.base import X

__all__ = [
    "GuardrailConfig",
    "GuardrailDecision",
    "Guardrail",
    "TwoTowerEncoder",
    "roc_auc",
    "retrieval_auc",
]

log = logging.getLogger(__name__)


class TwoTowerEncoder(Protocol):
    """What the indexer needs from a frozen two-tower model.

    ``encode_items(xs)`` and ``encode_users(xs)`` return (N, D) float32, L2-normalised,
    so a dot product is the retrieval score.
    """

    def encode_items(self, xs: Sequence[X]) -> np.ndarray: ...

    def encode_users(self, xs: Sequence[X]) -> np.ndarray: ...


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC by ranks (ties get the mean rank); None if only one class is present."""
    # One implementation of AUC in the project (learners.metrics, tested against a brute-force
    # pairwise count); this keeps the guardrail's (scores, labels) order and None for one class.
    auc = _roc_auc(np.asarray(labels).astype(np.int64), np.asarray(scores, dtype=np.float64))
    return None if np.isnan(auc) else float(auc)


def retrieval_auc(encoder: TwoTowerEncoder, xs: Sequence[X], ys: Sequence[int] | np.ndarray) -> float | None:
    """AUC of ``<encode_users(x), encode_items(x)>`` against the click labels ``ys``."""
    if len(xs) == 0:
        return None
    users = np.asarray(encoder.encode_users(xs), dtype=np.float32)
    items = np.asarray(encoder.encode_items(xs), dtype=np.float32)
    scores = np.einsum("nd,nd->n", users, items)
    if not np.isfinite(scores).all():
        return 0.0
    return roc_auc(scores, np.asarray(ys))


@dataclass(frozen=True)
class GuardrailConfig:
    """Thresholds of :class:`Guardrail`.

    Parameters
    ----------
    min_recall
        Absolute floor of the candidate's probe recall@K.
    max_recall_drop
        Largest allowed drop of recall@K below the served version's.
    max_auc_drop
        Largest allowed drop of the held-out AUC below the served model's.
    min_auc
        Absolute floor of the held-out AUC (None: no floor).
    max_item_loss
        Largest allowed fraction of the served item count missing from the candidate.
    """

    min_recall: float = 0.90
    max_recall_drop: float = 0.02
    max_auc_drop: float = 0.02
    min_auc: float | None = None
    max_item_loss: float = 0.5


@dataclass(frozen=True)
class GuardrailDecision:
    """The verdict on one candidate: accepted, or refused with reasons."""

    accepted: bool
    reasons: tuple[str, ...]
    candidate: Mapping[str, Any]
    baseline: Mapping[str, Any] | None


def _num(m: Mapping[str, Any] | None, key: str) -> float | None:
    if m is None:
        return None
    v = m.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


class Guardrail:
    """Judges candidates against the served version and counts refusals."""

    def __init__(self, config: GuardrailConfig = GuardrailConfig()) -> None:
        self.config = config
        self.refused_total = 0
        self.accepted_total = 0
        self.refusals: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"Guardrail(config={self.config!r})"

    def check(self, candidate: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> GuardrailDecision:
        """Accept or refuse ``candidate`` (keys ``recall``, ``auc``, ``item_count``).

        ``baseline`` holds the same keys for the served version (None: nothing served,
        only the absolute floors apply).
        """
        c = self.config
        reasons: list[tuple[str, str]] = []
        recall, auc, items = _num(candidate, "recall"), _num(candidate, "auc"), _num(candidate, "item_count")
        b_recall, b_auc, b_items = _num(baseline, "recall"), _num(baseline, "auc"), _num(baseline, "item_count")
        if candidate.get("finite") is False:
            reasons.append(("non_finite", "item vectors contain NaN or infinite values"))
        if recall is not None:
            if recall < c.min_recall:
                reasons.append(("recall", f"recall {recall:.3f} is below the floor {c.min_recall:.3f}"))
            elif b_recall is not None and b_recall - recall > c.max_recall_drop:
                reasons.append(("recall", f"recall {recall:.3f} is {b_recall - recall:.3f} below the served "
                                          f"{b_recall:.3f} (allowed drop {c.max_recall_drop:.3f})"))
        if auc is not None:
            if c.min_auc is not None and auc < c.min_auc:
                reasons.append(("auc", f"auc {auc:.3f} is below the floor {c.min_auc:.3f}"))
            elif b_auc is not None and b_auc - auc > c.max_auc_drop:
                reasons.append(("auc", f"auc {auc:.3f} is {b_auc - auc:.3f} below the served {b_auc:.3f} "
                                       f"(allowed drop {c.max_auc_drop:.3f})"))
        if items is not None and b_items:
            if items < (1.0 - c.max_item_loss) * b_items:
                reasons.append(("item_count", f"{int(items)} items is fewer than {1 - c.max_item_loss:.0%} of "
                                              f"the served {int(b_items)}"))
        decision = GuardrailDecision(
            accepted=not reasons,
            reasons=tuple(r for _, r in reasons),
            candidate=dict(candidate),
            baseline=None if baseline is None else dict(baseline),
        )
        if reasons:
            self.refused_total += 1
            for key, _ in reasons:
                self.refusals[key] += 1
            log.warning("guardrail refused build: %s", "; ".join(decision.reasons))
        else:
            self.accepted_total += 1
        return decision
