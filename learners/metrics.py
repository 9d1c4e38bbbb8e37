"""Prequential (test-then-train) metrics: AUC and logloss, cumulative and rolling.

:func:`roc_auc` is the exact ROC AUC with ties counted as half, like scikit-learn's
``roc_auc_score``. :class:`PrequentialMetrics` keeps, in bounded memory:

* the cumulative AUC over every event, from fine histograms of the predicted logit
  (``auc_bins`` bins over ``[-auc_logit_range, +auc_logit_range]``). A positive and a
  negative in the same bin count as a tie, so the value can differ from the exact AUC by
  at most ``auc_max_error`` (reported beside it; about 1e-4 in practice);
* the exact AUC and the mean logloss over the last ``window`` events;
* the cumulative logloss (probabilities clipped to ``[eps, 1 - eps]``), the counts of
  events and clicks, and events per second measured with an injected clock.

>>> m = PrequentialMetrics(window=4)
>>> m.update(np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6]))
>>> m.update(np.array([1, 0]), np.array([0.2, 0.7]))
>>> s = m.snapshot()
>>> s["n"], s["clicks"], round(s["auc"], 3), round(s["rolling_auc"], 3)
(6, 3, 0.667, 0.25)
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["PrequentialMetrics", "roc_auc", "log_loss", "as_labels"]


def as_labels(ys: Sequence[int] | np.ndarray, n: int | None = None) -> np.ndarray:
    """Labels as a float64 array of shape (n,), each 0 or 1 (``ValueError`` otherwise).

    >>> as_labels([1, 0, True])
    array([1., 0., 1.])
    """
    arr = np.asarray(ys, dtype=np.float64).reshape(-1)
    if n is not None and arr.shape != (n,):
        raise ValueError(f"got {arr.shape[0]} labels for {n} examples")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError("labels must be 0 or 1")
    return arr


def _probabilities(p: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"got {arr.shape[0]} predictions for {n} labels")
    if arr.size and not (np.all(np.isfinite(arr)) and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise ValueError("predicted probabilities must be finite and in [0, 1]")
    return arr


def roc_auc(y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Exact ROC AUC: P(score of a positive > score of a negative), ties counted 1/2.

    Computed from average ranks (Mann-Whitney U), O(n log n). Returns ``nan`` when
    ``y_true`` holds a single class (scikit-learn raises there instead).

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([0, 1], [0.5, 0.5])
    0.5
    """
    y = as_labels(y_true)
    s = np.asarray(p, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"got {s.shape[0]} scores for {y.shape[0]} labels")
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # average 1-based rank of each run of tied scores
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg_rank, ends - starts)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(y_true: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy with ``p`` clipped to ``[eps, 1 - eps]``; ``nan`` if empty.

    >>> round(log_loss(np.array([1, 0]), np.array([0.9, 0.2])), 4)
    0.1643
    """
    y = as_labels(y_true)
    if not len(y):
        return float("nan")
    return float(_log_losses(y, np.asarray(p, dtype=np.float64), eps).mean())


def _log_losses(y: np.ndarray, p: np.ndarray, eps: float) -> np.ndarray:
    """Per-example binary cross-entropy: ``-log`` of the probability given to the label."""
    q = np.where(y == 1, p, 1.0 - p)
    return -np.log(np.clip(q, eps, 1.0 - eps))


class PrequentialMetrics:
    """Streaming AUC / logloss / counts / throughput (see the module docstring).

    Parameters
    ----------
    window
        Number of most recent events for the rolling AUC and logloss.
    auc_bins, auc_logit_range
        Histogram resolution of the cumulative AUC (bins of the logit of ``p``).
    eps
        Probability clipping for the logloss.
    clock
        Seconds as a float (``time.perf_counter`` by default); events/s is measured
        from the construction of the object (or the last :meth:`reset`).
    """

    def __init__(
        self,
        window: int = 10_000,
        auc_bins: int = 1 << 18,
        auc_logit_range: float = 20.0,
        eps: float = 1e-7,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if auc_bins < 2:
            raise ValueError(f"auc_bins must be >= 2, got {auc_bins}")
        self.window = int(window)
        self.auc_bins = int(auc_bins)
        self.auc_logit_range = float(auc_logit_range)
        logits = np.linspace(-self.auc_logit_range, self.auc_logit_range, self.auc_bins + 1)[1:-1]
        self._edges = 1.0 / (1.0 + np.exp(-logits))  # inner edges, increasing: auc_bins bins
        self.eps = float(eps)
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget everything and restart the clock."""
        self.n = 0
        self.clicks = 0
        self._loss_sum = 0.0
        self._pos_hist = np.zeros(self.auc_bins, dtype=np.int64)
        self._neg_hist = np.zeros(self.auc_bins, dtype=np.int64)
        self._ring_y = np.zeros(self.window)
        self._ring_p = np.zeros(self.window)
        self._ring_loss = np.zeros(self.window)
        self._ring_next = 0
        self._started = self.clock()

    def _bin(self, p: np.ndarray) -> np.ndarray:
        """Histogram bin of each probability: bins are equal steps of the logit over
        ``[-auc_logit_range, auc_logit_range]`` (the outermost ones also take the tails)."""
        return np.searchsorted(self._edges, p, side="right")

    def update(self, y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> None:
        """Add a batch of labels (0/1) and the probabilities predicted *before* learning them."""
        y = as_labels(y_true)
        q = _probabilities(p, len(y))
        if not len(y):
            return
        losses = _log_losses(y, q, self.eps)
        self.n += len(y)
        self.clicks += int(y.sum())
        self._loss_sum += float(losses.sum())
        bins = self._bin(q)
        pos = y == 1
        np.add.at(self._pos_hist, bins[pos], 1)
        np.add.at(self._neg_hist, bins[~pos], 1)
        # the ring keeps the last `window` events
        k = min(len(y), self.window)
        start = self._ring_next
        head = min(k, self.window - start)  # up to the end of the ring, then wrap
        for ring, new in ((self._ring_y, y[-k:]), (self._ring_p, q[-k:]), (self._ring_loss, losses[-k:])):
            ring[start : start + head] = new[:head]
            ring[: k - head] = new[head:]
        self._ring_next = (start + k) % self.window

    def _binned_auc(self) -> tuple[float, float]:
        pos, neg = self._pos_hist, self._neg_hist
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan"), float("nan")
        neg_below = np.cumsum(neg) - neg
        ties = float(np.dot(pos.astype(np.float64), neg))
        wins = float(np.dot(pos.astype(np.float64), neg_below))
        pairs = float(n_pos) * float(n_neg)
        return (wins + 0.5 * ties) / pairs, 0.5 * ties / pairs

    def snapshot(self) -> dict[str, Any]:
        """The current values as a plain dict (``nan`` where a value is undefined yet).

        Keys: ``n``, ``clicks``, ``ctr``, ``auc``, ``auc_max_error``, ``logloss``,
        ``rolling_n``, ``rolling_auc``, ``rolling_logloss``, ``elapsed_s``, ``events_per_s``.
        """
        auc, auc_err = self._binned_auc()
        k = min(self.n, self.window)
        ring_y, ring_p, ring_loss = self._ring_y[:k], self._ring_p[:k], self._ring_loss[:k]
        elapsed = self.clock() - self._started
        return {
            "n": self.n,
            "clicks": self.clicks,
            "ctr": self.clicks / self.n if self.n else float("nan"),
            "auc": auc,
            "auc_max_error": auc_err,
            "logloss": self._loss_sum / self.n if self.n else float("nan"),
            "rolling_n": k,
            "rolling_auc": roc_auc(ring_y, ring_p) if k else float("nan"),
            "rolling_logloss": float(ring_loss.mean()) if k else float("nan"),
            "elapsed_s": elapsed,
            "events_per_s": self.n / elapsed if elapsed > 0 else float("nan"),
        }

    def __repr__(self) -> str:
        s = self.snapshot()
        return (
            f"PrequentialMetrics(n={s['n']}, auc={s['auc']:.4f}, rolling_auc={s['rolling_auc']:.4f}, "
            f"logloss={s['logloss']:.4f})"
            if s["n"] and not math.isnan(s["auc"])
            else f"PrequentialMetrics(n={s['n']})"
        )
