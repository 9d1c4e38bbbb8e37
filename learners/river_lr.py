"""Generation 2 (reference): River's online logistic regression on explicit sparse features.

The features are built directly as a dict, with the same tokens as the hashed learner
(:func:`learners.hashing.feature_tokens`): ``"name=value": 1.0`` for categories, one
token per element of a tuple, numbers as they are (integer positions as categories),
plus crosses such as ``"user_id=u1&i:category=c3"``. River's ``OneHotEncoder`` is not
used: it slows to about a thousand events per second as categories accumulate.

River learns one example at a time, so ``learn_many`` is a loop of ``learn_one``.

>>> lr = RiverLogisticRegression(lr=0.5)
>>> for _ in range(30):
...     lr.learn_one({"user_id": "u1", "item_id": "good"}, 1)
...     lr.learn_one({"user_id": "u1", "item_id": "bad"}, 0)
>>> lr.predict_proba_one({"user_id": "u1", "item_id": "good"}) > 0.8
True
>>> sorted(river_features({"user_id": "u1", "i:cat": "c3", "ctx:position": 2}, (("user_id", "i:*"),)))
['ctx:position=2', 'i:cat=c3', 'user_id=u1', 'user_id=u1&i:cat=c3']
"""

from __future__ import annotations

import fnmatch
import pickle
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from learners.base import X
from learners.hashing import DEFAULT_CROSSES, feature_tokens
from learners.metrics import as_labels

__all__ = ["RiverLogisticRegression", "river_features"]

_EXCLUDE = frozenset({"ctx:event_time"})


def _resolve_crosses(names: Sequence[str], crosses: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for a_pat, b_pat in crosses:
        for a in names:
            if not fnmatch.fnmatchcase(a, a_pat):
                continue
            for b in names:
                if a != b and fnmatch.fnmatchcase(b, b_pat) and (a, b) not in pairs and (b, a) not in pairs:
                    pairs.append((a, b))
    return pairs


def river_features(
    x: X,
    crosses: Sequence[Sequence[str]] = DEFAULT_CROSSES,
    categorical: Sequence[str] = ("ctx:position",),
    _cache: dict[Any, list[tuple[str, str]]] | None = None,
) -> dict[str, float]:
    """The sparse feature dict of one example (``x`` is not modified)."""
    tokens: dict[str, list[tuple[str, float]]] = {}
    for name, value in x.items():
        if name not in _EXCLUDE:
            tokens[name] = feature_tokens(name, value, categorical)
    key = tuple(tokens)
    pairs = _cache.get(key) if _cache is not None else None
    if pairs is None:
        pairs = _resolve_crosses(key, crosses)
        if _cache is not None:
            _cache[key] = pairs
    out: dict[str, float] = {}
    for toks in tokens.values():
        for t, v in toks:
            out[t] = out.get(t, 0.0) + v
    for a, b in pairs:
        for ta, va in tokens[a]:
            for tb, vb in tokens[b]:
                out[f"{ta}&{tb}"] = va * vb
    return out


class RiverLogisticRegression:
    """``river.linear_model.LogisticRegression`` behind the learner interface ("river-lr").

    Parameters
    ----------
    optimizer
        ``"sgd"`` or ``"adam"`` (River optimizers) with learning rate ``lr``.
    lr
        Learning rate of the weights; the intercept learns at ``intercept_lr``
        (``None``: the same as ``lr``).
    l2
        L2 regularisation (River's ``l2``).
    crosses, categorical
        Field crosses (``None``: :data:`learners.hashing.DEFAULT_CROSSES`) and integer
        fields treated as categories, as in :class:`~learners.linear.HashedLogisticRegression`.
    """

    learn_many_is_sequential = True

    def __init__(
        self,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.02,
        intercept_lr: float | None = None,
        l2: float = 0.0,
        crosses: Sequence[Sequence[str]] | None = None,
        categorical: Sequence[str] = ("ctx:position",),
    ) -> None:
        from river import linear_model, optim

        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.optimizer = optimizer
        self.lr = float(lr)
        self.intercept_lr = None if intercept_lr is None else float(intercept_lr)
        self.l2 = float(l2)
        self.crosses = None if crosses is None else [list(p) for p in crosses]
        self.categorical = list(categorical)
        self._crosses = tuple(tuple(p) for p in (DEFAULT_CROSSES if crosses is None else crosses))
        self._cross_cache: dict[Any, list[tuple[str, str]]] = {}
        opt = optim.SGD(self.lr) if optimizer == "sgd" else optim.Adam(self.lr)
        self.model = linear_model.LogisticRegression(
            optimizer=opt,
            l2=self.l2,
            intercept_lr=self.lr if intercept_lr is None else self.intercept_lr,
        )
        self.n_learned = 0

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "name": "river-lr",
            "params": {
                "optimizer": self.optimizer,
                "lr": self.lr,
                "intercept_lr": self.intercept_lr,
                "l2": self.l2,
                "crosses": self.crosses,
                "categorical": self.categorical,
            },
        }

    def features(self, x: X) -> dict[str, float]:
        """The sparse feature dict River sees for ``x``."""
        return river_features(x, self._crosses, self.categorical, self._cross_cache)

    def predict_proba_one(self, x: X) -> float:
        return float(self.model.predict_proba_one(self.features(x))[True])

    def learn_one(self, x: X, y: int) -> None:
        y = int(as_labels([y])[0])
        self.model.learn_one(self.features(x), bool(y))
        self.n_learned += 1

    def predict_proba_many(self, xs: Sequence[X]) -> np.ndarray:
        return np.fromiter((self.predict_proba_one(x) for x in xs), dtype=np.float64, count=len(xs))

    def learn_many(self, xs: Sequence[X], ys: Sequence[int] | np.ndarray) -> None:
        """A loop of :meth:`learn_one`."""
        y = as_labels(ys, len(xs))
        for x, label in zip(xs, y):
            self.model.learn_one(self.features(x), bool(label))
        self.n_learned += len(xs)

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "model": pickle.dumps(self.model), "n_learned": self.n_learned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        model = pickle.loads(state["model"])
        if type(model).__name__ != "LogisticRegression":
            raise ValueError(f"state holds a {type(model).__name__}, expected a River LogisticRegression")
        self.model = model
        self.n_learned = int(state.get("n_learned", 0))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.spec["params"].items())
        return f"RiverLogisticRegression({params})"
