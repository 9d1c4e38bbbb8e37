"""Generation 1: the recent click-through rate of each item, not personalised.

Clicks and impressions per item are counted with exponential decay: an event ``age``
time units old weighs ``2 ** (-age / half_life)``. Time is either the number of events
learned (``time_unit="events"``) or event time in seconds read from ``x[time_key]``
(``time_unit="seconds"``; :func:`learners.evaluate.xy_from_events` can add it).

The prediction shrinks an item's decayed CTR toward the global decayed CTR with a Beta
prior of strength ``prior_strength`` (pseudo-impressions):

    p(item) = (clicks_item + m * p_global) / (impressions_item + m)

where the item's counts are decayed to the current time, so an item not seen for long
drifts back to the global CTR. An unseen item gets ``p_global`` =
``(clicks + 1) / (impressions + 2)`` over all items (decayed, Laplace-smoothed).

Counts decay lazily: each item stores counts as of its last event, and because every
count of an item decays by the same factor, ``learn_many`` gives the same state as a
loop of ``learn_one`` (up to floating-point rounding).

>>> ctr = CTRLearner(half_life=1000, prior_strength=10)
>>> for _ in range(100):
...     ctr.learn_many([{"item_id": "a"}, {"item_id": "b"}, {"item_id": "b"}], [1, 0, 0])
>>> [round(float(p), 2) for p in ctr.predict_proba_many([{"item_id": "a"}, {"item_id": "b"}, {"item_id": "new"}])]
[0.93, 0.02, 0.33]
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from learners.base import X
from learners.metrics import as_labels
from streams.columns import EventColumns

__all__ = ["CTRLearner", "TimeUnit"]

TimeUnit = Literal["events", "seconds"]


class CTRLearner:
    """Decayed per-item CTR with Beta-prior smoothing (registry name ``"ctr"``).

    Parameters
    ----------
    half_life
        Half-life of the counts, in events or seconds (see ``time_unit``).
    time_unit
        ``"events"``: time advances by one per event learned. ``"seconds"``: time is
        ``x[time_key]`` (``ValueError`` when an example to learn lacks it).
    prior_strength
        ``m``, the weight in impressions of the global CTR in each item's estimate.
    key
        The field identifying what a CTR is counted for (``"item_id"``).
    time_key
        Field holding the event time in seconds, for ``time_unit="seconds"``.
    """

    #: ``learn_many`` equals a loop of ``learn_one`` (up to float rounding).
    learn_many_is_sequential = True

    def __init__(
        self,
        half_life: float = 100_000.0,
        time_unit: TimeUnit = "events",
        prior_strength: float = 20.0,
        key: str = "item_id",
        time_key: str = "ctx:event_time",
    ) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        if time_unit not in ("events", "seconds"):
            raise ValueError(f"time_unit must be 'events' or 'seconds', got {time_unit!r}")
        if not prior_strength > 0:
            raise ValueError(f"prior_strength must be > 0, got {prior_strength}")
        self.half_life = float(half_life)
        self.time_unit = time_unit
        self.prior_strength = float(prior_strength)
        self.key = key
        self.time_key = time_key
        self._index: dict[str, int] = {}
        self._clicks = np.zeros(0)
        self._imps = np.zeros(0)
        self._last = np.zeros(0)  # time each item's counts refer to
        self._g_clicks = 0.0
        self._g_imps = 0.0
        self._now = 0.0  # latest time seen: global counts refer to it
        self.n_learned = 0

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "name": "ctr",
            "params": {
                "half_life": self.half_life,
                "time_unit": self.time_unit,
                "prior_strength": self.prior_strength,
                "key": self.key,
                "time_key": self.time_key,
            },
        }

    def _decay(self, age: np.ndarray | float) -> np.ndarray | float:
        return np.exp2(-np.asarray(age) / self.half_life)

    def _global_ctr(self) -> float:
        return (self._g_clicks + 1.0) / (self._g_imps + 2.0)

    def _times(self, xs: Sequence[X]) -> np.ndarray:
        n = len(xs)
        if self.time_unit == "events":
            return self.n_learned + 1.0 + np.arange(n, dtype=np.float64)
        try:
            t = np.array([x[self.time_key] for x in xs], dtype=np.float64)
        except KeyError:
            raise ValueError(
                f"time_unit='seconds' needs the event time in x[{self.time_key!r}]; build examples with "
                "learners.evaluate.xy_from_events(..., time_key=...) or use time_unit='events'"
            ) from None
        if not np.all(np.isfinite(t)):
            raise ValueError(f"x[{self.time_key!r}] must be a finite number of seconds")
        return t

    def _keys(self, xs: Sequence[X]) -> list[Any]:
        """``x.get(key)`` of each example (C-level for dicts)."""
        try:
            return list(map(dict.get, xs, repeat(self.key)))
        except TypeError:  # a Mapping that is not a dict
            return [x.get(self.key) for x in xs]

    def predict_proba_many(self, xs: Sequence[X]) -> np.ndarray:
        """P(click) of each example, shape (B,)."""
        return self._predict_keys(self._keys(xs))

    def _predict_keys(self, keys: list[Any]) -> np.ndarray:
        g = self._global_ctr()
        index = self._index
        idx = np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        p = np.full(len(keys), g)
        seen = idx >= 0
        if seen.any():
            i = idx[seen]
            d = self._decay(self._now - self._last[i])
            m = self.prior_strength
            p[seen] = (self._clicks[i] * d + m * g) / (self._imps[i] * d + m)
        return p

    def learn_many(self, xs: Sequence[X], ys: Sequence[int] | np.ndarray) -> None:
        """Count a batch (same result as a loop of :meth:`learn_one`)."""
        y = as_labels(ys, len(xs))
        if not len(xs):
            return
        self._learn_keys(self._keys(xs), y, self._times(xs))

    def predict_learn_columns(self, cols: EventColumns) -> np.ndarray:
        """Predict then learn the rows of a column batch of impressions (their labels):
        what :meth:`predict_proba_many` then :meth:`learn_many` give on
        ``columns_to_xs(cols)``, read from the id column."""
        if self.key not in ("item_id", "user_id") or self.time_unit != "events":
            raise NotImplementedError("the column path counts per item_id or user_id in time_unit='events'")
        keys = cols.item_id if self.key == "item_id" else cols.user_id
        p = self._predict_keys(keys)
        if len(keys):
            self._learn_keys(keys, as_labels(cols.label, len(keys)), self._times(keys))
        return p

    def _learn_keys(self, keys: list[Any], y: np.ndarray, t: np.ndarray) -> None:
        self._learn_items(keys, y, t)
        # global counts refer to the latest time seen
        now = max(self._now, float(t.max())) if self.n_learned else float(t.max())
        wg = self._decay(now - t)
        dg = self._decay(now - self._now) if self.n_learned else 0.0
        self._g_clicks = float(self._g_clicks * dg + np.dot(wg, y))
        self._g_imps = float(self._g_imps * dg + wg.sum())
        self._now = now
        self.n_learned += len(keys)

    def _learn_items(self, keys: list[Any], y: np.ndarray, t: np.ndarray) -> None:
        index = self._index
        n_known = len(index)
        for k in dict.fromkeys(keys):  # new keys get the next indices, in order of appearance
            if k not in index and k is not None:
                index[k] = len(index)
        # no key (None): counts toward the global CTR only
        idx = np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        has_key = idx >= 0
        if not has_key.all():
            idx, y, t = idx[has_key], y[has_key], t[has_key]
        if not len(idx):
            return
        if len(index) > n_known:
            grow = len(index) - n_known
            self._clicks = np.concatenate([self._clicks, np.zeros(grow)])
            self._imps = np.concatenate([self._imps, np.zeros(grow)])
            self._last = np.concatenate([self._last, np.full(grow, -np.inf)])
        # per item: refer counts to the latest of its stored time and its new events
        uniq, inv = np.unique(idx, return_inverse=True)
        t_max = np.full(len(uniq), -np.inf)
        np.maximum.at(t_max, inv, t)
        ref = np.maximum(self._last[uniq], t_max)
        old = np.where(np.isfinite(self._last[uniq]), self._decay(ref - self._last[uniq]), 0.0)
        w = self._decay(ref[inv] - t)
        self._clicks[uniq] = self._clicks[uniq] * old + np.bincount(inv, weights=w * y, minlength=len(uniq))
        self._imps[uniq] = self._imps[uniq] * old + np.bincount(inv, weights=w, minlength=len(uniq))
        self._last[uniq] = ref

    def predict_proba_one(self, x: X) -> float:
        return float(self.predict_proba_many([x])[0])

    def learn_one(self, x: X, y: int) -> None:
        self.learn_many([x], [y])

    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "keys": list(self._index),
            "clicks": self._clicks.copy(),
            "imps": self._imps.copy(),
            "last": self._last.copy(),
            "global_clicks": self._g_clicks,
            "global_imps": self._g_imps,
            "now": self._now,
            "n_learned": self.n_learned,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = list(state["keys"])
        arrays = [np.array(state[name], dtype=np.float64) for name in ("clicks", "imps", "last")]
        if any(a.shape != (len(keys),) for a in arrays):
            raise ValueError("CTR state is inconsistent: clicks/imps/last must have one entry per key")
        self._index = {k: i for i, k in enumerate(keys)}
        self._clicks, self._imps, self._last = arrays
        self._g_clicks = float(state["global_clicks"])
        self._g_imps = float(state["global_imps"])
        self._now = float(state["now"])
        self.n_learned = int(state["n_learned"])

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.spec["params"].items())
        return f"CTRLearner({params})"
