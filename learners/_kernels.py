"""Compiled (numba) inner loops of the hashed logistic regression's mini-batch step.

Each kernel does exactly the floating-point operations of the numpy expressions it
replaces, in the same order, so its results are bitwise those of the numpy path
(``tests/test_learners/test_linear.py`` checks it): a row's logit and a coordinate's
summed gradient add their entries in entry order, as ``np.bincount`` does, and the
optimizer formulas are written term for term. What it saves is numpy's temporaries and
passes: the de-duplication of coordinates (a scatter, a gather and a ``flatnonzero``
over every entry) becomes one pass with a mark array, and the FTRL step one loop over
the touched coordinates instead of a dozen whole-array operations.

numba compiles them on first use (``cache=True`` keeps the machine code beside this
file, so later processes load it). ``nogil``: a learner thread does not hold up the
process's other threads while it learns.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["logits", "ftrl_step", "sgd_step"]


@njit(cache=True, nogil=True)
def logits(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, w: np.ndarray, n_rows: int) -> np.ndarray:
    """``np.bincount(rows, weights=w[cols] * vals, minlength=n_rows)``."""
    out = np.zeros(n_rows)
    for e in range(cols.shape[0]):
        out[rows[e]] += w[cols[e]] * vals[e]
    return out


@njit(cache=True, nogil=True)
def _gather_gradient(rows, cols, vals, err, gbias, bias, gacc, mark):  # pragma: no cover - compiled
    """The distinct coordinates of a batch (first-seen order, the intercept last) with
    their gradient ``err[row] * val`` summed in entry order; ``gacc``/``mark`` are
    scratch arrays of the model's size, left all-False."""
    m = cols.shape[0]
    touched = np.empty(m + 1, dtype=np.int64)
    k = 0
    for e in range(m):
        c = cols[e]
        g = err[rows[e]] * vals[e]
        if mark[c]:
            gacc[c] += g
        else:
            mark[c] = True
            gacc[c] = g
            touched[k] = c
            k += 1
    gacc[bias] = gbias
    touched[k] = bias
    k += 1
    for t in range(k):
        mark[touched[t]] = False
    return touched[:k]


@njit(cache=True, nogil=True)
def ftrl_step(rows, cols, vals, err, gbias, bias, w, z, n, gacc, mark, alpha, beta, l1, l2):  # pragma: no cover
    """One FTRL-proximal step (HashedLogisticRegression._step) on the batch's summed gradient."""
    touched = _gather_gradient(rows, cols, vals, err, gbias, bias, gacc, mark)
    for t in range(touched.shape[0]):
        c = touched[t]
        g = gacc[c]
        n_u = n[c]
        w_u = w[c]
        n_new = n_u + g * g
        z_new = z[c] + g - (np.sqrt(n_new) - np.sqrt(n_u)) / alpha * w_u
        z[c] = z_new
        n[c] = n_new
        if l1 > 0:
            shrunk = np.sign(z_new) * max(abs(z_new) - l1, 0.0)
        else:
            shrunk = z_new
        w[c] = -shrunk / ((beta + np.sqrt(n_new)) / alpha + l2)


@njit(cache=True, nogil=True)
def sgd_step(rows, cols, vals, err, gbias, bias, w, gacc, mark, lr, l2):  # pragma: no cover
    """One SGD step with L2 on the touched weights (HashedLogisticRegression._step)."""
    touched = _gather_gradient(rows, cols, vals, err, gbias, bias, gacc, mark)
    for t in range(touched.shape[0]):
        c = touched[t]
        w_u = w[c]
        w[c] = w_u - lr * (gacc[c] + l2 * w_u)
