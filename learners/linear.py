"""Generation 2 (vectorized): logistic regression on hashed features, FTRL-proximal or SGD.

:class:`HashedLogisticRegression` hashes each example with
:class:`~learners.hashing.FeatureHasher` (ids, categories, multi-valued features, user x
item crosses, position) into ``2**bits`` weights and learns from whole mini-batches in
numpy.

``optimizer="ftrl"`` is FTRL-proximal (McMahan et al., 2013, "Ad click prediction: a view
from the trenches", algorithm 1) with per-coordinate learning rates and L1/L2: the
gradient of a mini-batch is summed per coordinate and applied as one FTRL step (so a
coordinate's ``n`` grows by the square of its summed gradient: conservative, and stable
for any batch size, at the price of slower learning for features frequent in a batch).
``optimizer="sgd"`` takes one plain SGD step with the summed gradient of the batch
(``lr`` is per example; L2 applies to the touched weights). Keep ``lr * batch_size``
moderate: the intercept sees every example of a batch at once.

So ``learn_many`` is *not* a loop of ``learn_one``: within a batch every example is
predicted with the weights from before the batch (``learn_many_is_sequential = False``).
A batch of one is exactly ``learn_one``.

>>> lr = HashedLogisticRegression(bits=16)
>>> xs = [{"user_id": "u1", "item_id": "good"}, {"user_id": "u1", "item_id": "bad"}] * 5
>>> for _ in range(50):
...     lr.learn_many(xs, [1, 0] * 5)
>>> p = lr.predict_proba_many(xs[:2])
>>> bool(p[0] > 0.8 and p[1] < 0.2)
True
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import numpy as np

from learners import _kernels
from learners.base import X
from learners.hashing import FeatureHasher, HashedBatch
from learners.metrics import as_labels
from streams.columns import EventColumns

__all__ = ["HashedLogisticRegression", "Optimizer"]

Optimizer = Literal["ftrl", "sgd"]
_MAX_LOGIT = 35.0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -_MAX_LOGIT, _MAX_LOGIT)))


class HashedLogisticRegression:
    """Online logistic regression on ``2**bits`` hashed features (registry name ``"lr"``).

    Parameters
    ----------
    bits
        Hash bits: ``2**bits`` weights (plus an intercept).
    optimizer
        ``"ftrl"`` (FTRL-proximal, per-coordinate rates) or ``"sgd"``.
    alpha, beta
        FTRL learning-rate parameters: coordinate ``i`` learns at
        ``alpha / (beta + sqrt(sum of its squared gradients))``.
    l1, l2
        Regularisation strengths (FTRL: as in the paper; SGD: ``l2`` only).
    lr
        SGD learning rate.
    crosses, categorical
        Passed to :class:`~learners.hashing.FeatureHasher` (``None``: its default crosses).
    """

    #: ``learn_many`` uses the weights from before the batch for the whole batch.
    learn_many_is_sequential = False
    #: Learn through the compiled kernels (:mod:`learners._kernels`); ``False`` runs the
    #: numpy expressions they replace (bitwise the same results, slower).
    use_kernels = True

    def __init__(
        self,
        bits: int = 20,
        optimizer: Optimizer = "ftrl",
        alpha: float = 0.2,
        beta: float = 1.0,
        l1: float = 1.0,
        l2: float = 1.0,
        lr: float = 0.05,
        crosses: Sequence[Sequence[str]] | None = None,
        categorical: Sequence[str] = ("ctx:position",),
    ) -> None:
        if optimizer not in ("ftrl", "sgd"):
            raise ValueError(f"optimizer must be 'ftrl' or 'sgd', got {optimizer!r}")
        for name, value in (("alpha", alpha), ("lr", lr)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("beta", beta), ("l1", l1), ("l2", l2)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.bits = int(bits)
        self.optimizer = optimizer
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.l1 = float(l1)
        self.l2 = float(l2)
        self.lr = float(lr)
        self.crosses = None if crosses is None else [list(p) for p in crosses]
        self.categorical = list(categorical)
        self.hasher = FeatureHasher(bits=self.bits, crosses=crosses, categorical=categorical)
        size = (1 << self.bits) + 1  # the last coordinate is the intercept
        self._bias = size - 1
        self._w = np.zeros(size)  # the weights (for FTRL, a function of z and n kept in step)
        if optimizer == "ftrl":
            self._z = np.zeros(size)
            self._n = np.zeros(size)
        self._slot: np.ndarray | None = None  # the numpy step's scratch for de-duplicating coordinates (lazy:
        # the kernels never need it, and it is 8 bytes per coordinate)
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None  # the kernels' (gradient, mark)
        self._pending: np.ndarray | None = None  # deferred mode: the summed gradient not yet applied
        self._touched: np.ndarray | None = None  # deferred mode: the coordinates it touched
        self.n_learned = 0

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "name": "lr",
            "params": {
                "bits": self.bits,
                "optimizer": self.optimizer,
                "alpha": self.alpha,
                "beta": self.beta,
                "l1": self.l1,
                "l2": self.l2,
                "lr": self.lr,
                "crosses": self.crosses,
                "categorical": self.categorical,
            },
        }

    # -- weights -----------------------------------------------------------------------------

    def _ftrl_weights(self, z: np.ndarray, n: np.ndarray) -> np.ndarray:
        """FTRL-proximal's closed form: the weights of accumulators ``z`` and ``n``."""
        shrunk = np.sign(z) * np.maximum(np.abs(z) - self.l1, 0.0) if self.l1 > 0 else z
        return -shrunk / ((self.beta + np.sqrt(n)) / self.alpha + self.l2)

    def _forward(self, xs: Sequence[X]) -> tuple[np.ndarray, HashedBatch]:
        batch = self.hasher.transform(xs)
        return self._predict(batch), batch

    def _predict(self, batch: HashedBatch) -> np.ndarray:
        if self.use_kernels:
            logit = _kernels.logits(batch.rows, batch.cols, batch.vals, self._w, batch.n_rows)
        else:
            logit = np.bincount(batch.rows, weights=self._w[batch.cols] * batch.vals, minlength=batch.n_rows)
        return _sigmoid(logit + self._w[self._bias])

    def _update(self, p: np.ndarray, ys: np.ndarray, batch: HashedBatch) -> None:
        err = p - ys
        if self.use_kernels and self._pending is None:
            if self._scratch is None:
                self._scratch = (np.zeros_like(self._w), np.zeros(self._w.shape, dtype=np.bool_))
            gacc, mark = self._scratch
            args = (batch.rows, batch.cols, batch.vals, err, err.sum(), self._bias, self._w)
            if self.optimizer == "ftrl":
                _kernels.ftrl_step(*args, self._z, self._n, gacc, mark, self.alpha, self.beta, self.l1, self.l2)
            else:
                _kernels.sgd_step(*args, gacc, mark, self.lr, self.l2)
            self.n_learned += len(p)
            return
        cols = batch.cols
        g_entry = err[batch.rows] * batch.vals
        # de-duplicate coordinates in O(N): each entry finds its coordinate's representative
        pos = np.arange(len(cols), dtype=np.int64)
        if self._slot is None:
            self._slot = np.zeros(len(self._w), dtype=np.int64)
        self._slot[cols] = pos
        rep = self._slot[cols]
        first = np.flatnonzero(rep == pos)
        g = np.append(np.bincount(rep, weights=g_entry, minlength=len(cols))[first], err.sum())
        uc = np.append(cols[first], self._bias)
        if self._pending is None:
            self._step(uc, g)
        else:  # deferred (learners.distributed): keep the gradient, the model waits for apply_update
            self._pending[uc] += g
            self._touched[uc] = True
        self.n_learned += len(p)

    def _step(self, uc: np.ndarray, g: np.ndarray) -> None:
        """One optimizer step on the distinct coordinates ``uc`` with their summed gradient ``g``."""
        w_u = self._w[uc]
        if self.optimizer == "ftrl":
            n_u = self._n[uc]
            n_new = n_u + g * g
            z_new = self._z[uc] + g - (np.sqrt(n_new) - np.sqrt(n_u)) / self.alpha * w_u
            self._z[uc] = z_new
            self._n[uc] = n_new
            self._w[uc] = self._ftrl_weights(z_new, n_new)
        else:
            self._w[uc] = w_u - self.lr * (g + self.l2 * w_u)

    # -- the learner interface -------------------------------------------------------------

    def predict_proba_many(self, xs: Sequence[X]) -> np.ndarray:
        """P(click) of each example, shape (B,)."""
        if not len(xs):
            return np.zeros(0)
        return self._forward(xs)[0]

    def learn_many(self, xs: Sequence[X], ys: Sequence[int] | np.ndarray) -> None:
        """One mini-batch step on ``xs`` with labels ``ys`` (shape (B,), 0 or 1)."""
        self.predict_learn_many(xs, ys)

    def predict_learn_many(self, xs: Sequence[X], ys: Sequence[int] | np.ndarray) -> np.ndarray:
        """Predict ``xs`` (before learning), then learn them: hashes the batch once.

        Returns exactly what :meth:`predict_proba_many` would have returned.
        """
        ys = as_labels(ys, len(xs))
        if not len(xs):
            return np.zeros(0)
        p, batch = self._forward(xs)
        self._update(p, ys, batch)
        return p

    def predict_learn_columns(self, cols: EventColumns) -> np.ndarray:
        """:meth:`predict_learn_many` on the rows of a column batch of impressions (their
        labels), hashed from the columns: the same predictions and state as on
        ``columns_to_xs(cols)``."""
        if not len(cols):
            return np.zeros(0)
        ys = as_labels(cols.label, len(cols))
        batch = self.hasher.transform_columns(cols)
        p = self._predict(batch)
        self._update(p, ys, batch)
        return p

    def predict_proba_one(self, x: X) -> float:
        return float(self.predict_proba_many([x])[0])

    def learn_one(self, x: X, y: int) -> None:
        self.predict_learn_many([x], [y])

    # -- distributed sync hooks (learners.distributed) ------------------------------------

    def sync_arrays(self) -> list[np.ndarray]:
        """The live arrays that are the model (ranks compare their digests): ``w`` for SGD,
        the accumulators ``z`` and ``n`` for FTRL (``w`` follows them). learners.distributed
        syncs this learner by gradients (:meth:`defer_updates`), not by these arrays' deltas."""
        return [self._z, self._n] if self.optimizer == "ftrl" else [self._w]

    def after_sync(self) -> None:
        """Recompute what follows the synced arrays (FTRL's weights from ``z`` and ``n``)."""
        if self.optimizer == "ftrl":
            self._w[:] = self._ftrl_weights(self._z, self._n)

    def defer_updates(self) -> None:
        """Deferred mode, for data-parallel training (learners.distributed): from now on a
        learning call only adds its batch's gradient (summed per coordinate, without L2) to
        a pending gradient and marks the coordinates it touched; the model changes only in
        :meth:`apply_update`. Call one learning method per step: gradients of two calls
        between applies are both taken at the same weights."""
        if self._pending is None:
            self._pending = np.zeros_like(self._w)
            self._touched = np.zeros(self._w.shape, dtype=bool)

    def pending_update(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Deferred mode: ``(gradient, touched)`` since the last apply. ``touched`` is ``None``
        where the update of a coordinate with zero summed gradient is no update (FTRL; SGD
        without L2): then the gradient's non-zeros say all. Ranks sum the gradients and OR
        the masks, then each calls :meth:`apply_update` with the results."""
        if self._pending is None:
            raise RuntimeError("pending_update() needs defer_updates() first")
        needs_mask = self.optimizer == "sgd" and self.l2 > 0
        return self._pending, (self._touched if needs_mask else None)

    def apply_update(self, gradient: np.ndarray, touched: np.ndarray | None = None) -> None:
        """Deferred mode: one optimizer step with ``gradient`` (per coordinate, e.g. summed
        over ranks) on the coordinates ``touched`` (default: the gradient's non-zeros), as
        one ``learn_many`` on the union of the batches would take it (up to the order of
        the floating-point sums): FTRL's ``n`` grows by the square of the summed gradient,
        SGD's L2 shrinks each touched weight once. Clears the pending gradient."""
        if self._pending is None:
            raise RuntimeError("apply_update() needs defer_updates() first")
        uc = np.flatnonzero(gradient if touched is None else touched)
        self._step(uc, gradient[uc])
        self._pending[:] = 0.0
        self._touched[:] = False

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"spec": self.spec, "n_learned": self.n_learned}
        if self.optimizer == "ftrl":
            state["z"] = self._z.copy()
            state["n"] = self._n.copy()
        else:
            state["w"] = self._w.copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        spec = state.get("spec", {}).get("params", {})
        for key in ("bits", "optimizer"):
            if key in spec and spec[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint has {key}={spec[key]!r} but this learner has {key}={getattr(self, key)!r}; "
                    "build the learner from the checkpoint's spec"
                )
        names = ("z", "n") if self.optimizer == "ftrl" else ("w",)
        arrays = {}
        for name in names:
            arr = np.array(state[name], dtype=np.float64)
            if arr.shape != ((1 << self.bits) + 1,):
                raise ValueError(f"state {name!r} has shape {arr.shape}, expected ({(1 << self.bits) + 1},)")
            arrays[name] = arr
        if self.optimizer == "ftrl":
            self._z, self._n = arrays["z"], arrays["n"]
            self._w = self._ftrl_weights(self._z, self._n)
        else:
            self._w = arrays["w"]
        self.n_learned = int(state.get("n_learned", 0))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.spec["params"].items())
        return f"HashedLogisticRegression({params})"

