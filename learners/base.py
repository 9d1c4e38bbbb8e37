"""The one learner interface every towerstream learner speaks (River-like).

An example ``x`` is a flat mapping built from an event by :func:`event_to_x`:

* ``"user_id"`` and ``"item_id"``: the ids, as strings;
* ``"u:<name>"``: each user feature, ``"i:<name>"``: each item feature;
* ``"ctx:position"``: the slot the item was shown in (absent at serving time).

Values are strings (categories), numbers, or tuples of strings (multi-valued). ``y`` is
the click label, 0 or 1. Learners never mutate ``x``.

>>> from streams.events import Event
>>> e = Event(kind="impression", event_id="e", event_time=0.0, user_id="u1", request_id="r",
...           user_features={"age": "18-24"}, item_id="i2", item_features={"cat": "c1"},
...           label=0, position=3)
>>> sorted(event_to_x(e).items())
[('ctx:position', 3), ('i:cat', 'c1'), ('item_id', 'i2'), ('u:age', '18-24'), ('user_id', 'u1')]
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from streams.columns import NO_BLOCK, NO_VALUE, EventColumns
from streams.events import Event, FeatureValue

__all__ = ["Learner", "X", "event_to_x", "columns_to_xs", "ColumnExamples", "field_values", "prefixed_names", "USER_PREFIX", "ITEM_PREFIX",
           "CTX_PREFIX"]

X = Mapping[str, FeatureValue]
USER_PREFIX = "u:"
ITEM_PREFIX = "i:"
CTX_PREFIX = "ctx:"


# Prefixed feature names, one string object per name: every example of a stream then shares
# its keys, and the learners' per-field dict look-ups compare them by identity instead of
# character by character (~10% of the hashed LR's time). Bounded: past the cap (a stream
# with unbounded feature names) names are concatenated per example as before.
_USER_KEYS: dict[str, str] = {}
_ITEM_KEYS: dict[str, str] = {}
_MAX_KEYS = 4096
_POSITION_KEY = CTX_PREFIX + "position"


def _prefixed(cache: dict[str, str], prefix: str, name: str) -> str:
    key = prefix + name
    if len(cache) < _MAX_KEYS:
        cache[name] = key
    return key


def event_to_x(event: Event, *, with_position: bool = True) -> dict[str, FeatureValue]:
    """The learner-facing example of an impression or click (or a request: no item).

    >>> from streams.events import Event
    >>> e = Event(kind="impression", event_id="e1", event_time=0.0, user_id="u1", request_id="r1",
    ...           user_features={"age": "25-34"}, item_id="i9", item_features={"tags": ("a",)}, label=0, position=2)
    >>> event_to_x(e)
    {'user_id': 'u1', 'u:age': '25-34', 'item_id': 'i9', 'i:tags': ('a',), 'ctx:position': 2}
    """
    x: dict[str, FeatureValue] = {"user_id": event.user_id}
    keys = _USER_KEYS
    for name, value in event.user_features.items():
        x[keys.get(name) or _prefixed(keys, USER_PREFIX, name)] = value
    if event.item_id is not None:
        x["item_id"] = event.item_id
        keys = _ITEM_KEYS
        for name, value in event.item_features.items():
            x[keys.get(name) or _prefixed(keys, ITEM_PREFIX, name)] = value
    if with_position and event.position is not None:
        x[_POSITION_KEY] = event.position
    return x


def prefixed_names(names: Sequence[str], item: bool) -> tuple[str, ...]:
    """The example keys of user (``item=False``) or item feature names, the very strings
    :func:`event_to_x` uses."""
    keys, prefix = (_ITEM_KEYS, ITEM_PREFIX) if item else (_USER_KEYS, USER_PREFIX)
    return tuple(keys.get(name) or _prefixed(keys, prefix, name) for name in names)


def columns_to_xs(cols: EventColumns, *, with_position: bool = True) -> list[dict[str, FeatureValue]]:
    """:func:`event_to_x` of every row of a column batch (equal dicts, same key order),
    for learners fed examples (River, the two-tower updaters) and the hasher's
    mixed-fields path. An interned mapping's prefixed ``(key, value)`` pairs are built once
    per block id (:class:`~streams.columns.FeatureBlocks`) and reused by every row that
    carries it.

    >>> from streams.events import Event
    >>> e = Event(kind="impression", event_id="e1", event_time=0.0, user_id="u1", request_id="r1",
    ...           user_features={"age": "25-34"}, item_id="i9", item_features={"tags": ("a",)}, label=0, position=2)
    >>> columns_to_xs(EventColumns.from_events([e])) == [event_to_x(e)]
    True
    """
    out = []
    positions = cols.position.tolist() if with_position else repeat(NO_VALUE)
    user_pairs, item_pairs = _BLOCK_PAIRS[False], _BLOCK_PAIRS[True]
    if len(user_pairs) + len(item_pairs) > _MAX_BLOCK_PAIRS:
        user_pairs.clear()
        item_pairs.clear()
    for uid, ub, uf, iid, ib, itf, pos in zip(cols.user_id, cols.user_block.tolist(), cols.user_features,
                                              cols.item_id, cols.item_block.tolist(), cols.item_features, positions):
        x: dict[str, FeatureValue] = {"user_id": uid}
        pairs = user_pairs.get(ub)
        x.update(pairs if pairs is not None else _pairs(user_pairs, ub, uf, False))
        if iid is not None:
            x["item_id"] = iid
            pairs = item_pairs.get(ib)
            x.update(pairs if pairs is not None else _pairs(item_pairs, ib, itf, True))
        if pos != NO_VALUE:
            x[_POSITION_KEY] = pos
        out.append(x)
    return out


# block id -> the prefixed (key, value) pairs of its mapping, per side (False: user)
_BLOCK_PAIRS: dict[bool, dict[int, tuple[tuple[str, FeatureValue], ...]]] = {False: {}, True: {}}
_MAX_BLOCK_PAIRS = 1 << 17


def _pairs(cache: dict[int, tuple], block: int, features: Mapping[str, FeatureValue], item: bool) -> tuple:
    pairs = tuple(zip(prefixed_names(tuple(features), item), features.values()))
    if block != NO_BLOCK:
        cache[block] = pairs
    return pairs


class ColumnExamples(Sequence[dict[str, FeatureValue]]):
    """The examples of a column batch (what :func:`columns_to_xs` returns) without building
    them: a learner that reads its features a field at a time asks :meth:`column` and
    gets the values straight from the columns (the two-tower encoder does; so the
    runtime feeds it a column batch with no dict per event). Indexing a row builds (and
    keeps) that one example; a slice is the ``ColumnExamples`` of those rows.

    >>> from streams.events import Event
    >>> e = Event(kind="impression", event_id="e1", event_time=0.0, user_id="u1", request_id="r1",
    ...           user_features={"age": "25-34"}, item_id="i9", item_features={"tags": ("a",)}, label=0, position=2)
    >>> xs = ColumnExamples(EventColumns.from_events([e, e]))
    >>> xs.column("u:age"), xs.column("ctx:position"), xs.column("i:price"), xs[1] == event_to_x(e)
    (['25-34', '25-34'], [2, 2], [None, None], True)
    """

    __slots__ = ("cols", "_rows")

    def __init__(self, cols: EventColumns) -> None:
        self.cols = cols
        self._rows: list[dict[str, FeatureValue] | None] = [None] * len(cols)

    def __len__(self) -> int:
        return len(self.cols)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return ColumnExamples(self.cols.take(i))
        x = self._rows[i]
        if x is None:
            x = self._rows[i] = columns_to_xs(self.cols.take(slice(i, i + 1 if i != -1 else None)))[0]
        return x

    def __iter__(self) -> Any:
        if None in self._rows:
            self._rows = columns_to_xs(self.cols)
        return iter(self._rows)

    def column(self, key: str) -> list[Any]:
        """``[x.get(key) for x in self]``, read from the columns."""
        cols = self.cols
        if key == "user_id":
            return list(cols.user_id)
        if key == "item_id":
            return list(cols.item_id)
        if key == _POSITION_KEY:
            return [None if p == NO_VALUE else p for p in cols.position.tolist()]
        for prefix, mappings, item in ((USER_PREFIX, cols.user_features, False),
                                       (ITEM_PREFIX, cols.item_features, True)):
            if key.startswith(prefix):
                name = key[len(prefix):]
                if prefixed_names((name,), item)[0] != key:
                    break
                values = list(map(dict.get, mappings, repeat(name)))
                if item and None in cols.item_id:  # a request row has no item side at all
                    values = [None if iid is None else v for v, iid in zip(values, cols.item_id)]
                return values
        return [None] * len(cols)


def field_values(xs: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    """``[x.get(key) for x in xs]``: from the columns of a :class:`ColumnExamples`, with C
    loops for plain dicts."""
    column = getattr(xs, "column", None)
    if column is not None:
        return column(key)
    try:
        return list(map(dict.get, xs, repeat(key)))
    except TypeError:  # not plain dicts
        return [x.get(key) for x in xs]


@runtime_checkable
class Learner(Protocol):
    """What the stream runtime needs from a learner.

    ``predict_proba_*`` return P(click); batched methods take and return arrays of
    shape (B,). ``state_dict``/``load_state_dict`` round-trip everything needed to
    continue learning bit-for-bit (checkpoints add the Kafka offsets beside it).
    A method a learner cannot support raises ``NotImplementedError``.
    """

    def predict_proba_one(self, x: X) -> float: ...

    def learn_one(self, x: X, y: int) -> None: ...

    def predict_proba_many(self, xs: Sequence[X]) -> np.ndarray: ...

    def learn_many(self, xs: Sequence[X], ys: np.ndarray) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
