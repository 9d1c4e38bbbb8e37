"""From flat examples ``x`` to embedding rows: collisionless, growable id tables.

Why collisionless tables rather than hashing
--------------------------------------------
A stream keeps bringing ids never seen before (new users, new items). Two answers:

* *hashing* into a fixed table: no bookkeeping, but two ids that share a bucket share a
  vector forever; with a table small enough to be cheap the collision rate on the id
  features (the strongest signal a two-tower has) is high, and a popular new item can
  land on the row of an old one and inherit its vector;
* *collisionless tables* (Monolith, Liu et al. 2022): a dict ``key -> row`` per
  feature, rows handed out from a free list, the table grows when full, and rows of
  ids unseen for ``expire_after`` steps go back to the free list (re-initialised when
  reused).

We take the second: every id gets its own row, so a new id is learnable from its very
first event without disturbing others, memory follows the *live* id population instead
of the hash space, and expiry bounds it. The cost is one dict lookup per feature value,
which is also the cache of per-string indices the hot path needs anyway (strings are
never re-hashed into indices). A full table at ``max_rows`` evicts its least recently
seen rows rather than failing.

All fields share one :class:`EmbeddingStore` (one weight matrix, one ``unique`` and one
gather per batch); each field has its own key namespace, so ``u:age=25`` and
``i:year=25`` never meet. Multi-valued features (tuples) become bags averaged by
``embedding_bag``; a missing feature, or an unknown key at prediction time, is an empty
bag (a zero vector). Numbers are categories too: integers by value, other floats by
their two significant digits.

>>> import torch
>>> store = EmbeddingStore(dim=4, generator=torch.Generator().manual_seed(0))
>>> enc = FeatureEncoder(store, user_fields=("user_id", "u:age"), item_fields=("item_id", "i:genres"))
>>> xs = [{"user_id": "u1", "u:age": 25, "item_id": "i1", "i:genres": ("a", "b")}]
>>> batch = enc.encode(xs, xs, insert=True)
>>> batch.user.offsets.tolist(), batch.item.offsets.tolist(), len(store)
([0, 1], [0, 1], 5)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import chain, compress, repeat
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from learners.base import ITEM_PREFIX, USER_PREFIX, field_values

__all__ = ["EmbeddingStore", "FeatureEncoder", "TowerIndex", "EncodedBatch", "ColumnBags", "infer_fields",
           "feature_key"]

logger = logging.getLogger(__name__)


def feature_key(value: Any) -> Any:
    """The dict key of one categorical value (numbers become categories).

    >>> feature_key("x"), feature_key(3), feature_key(3.0), feature_key(0.123456), feature_key(True)
    ('x', 3, 3, 0.12, 1)
    """
    if type(value) is str:
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        return float(f"{value:.2g}")
    return str(value)


def infer_fields(xs: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """User and item field names seen in ``xs``: ids first, then sorted side features.

    >>> infer_fields([{"user_id": "u", "u:b": 1, "u:a": 2, "item_id": "i", "i:c": "x", "ctx:position": 0}])
    (('user_id', 'u:a', 'u:b'), ('item_id', 'i:c'))
    """
    user: set[str] = set()
    item: set[str] = set()
    for x in xs:
        for k in x:
            if k.startswith(USER_PREFIX):
                user.add(k)
            elif k.startswith(ITEM_PREFIX):
                item.add(k)
    return ("user_id", *sorted(user)), ("item_id", *sorted(item))


class EmbeddingStore:
    """Rows of embeddings for every (field, key), with Adagrad state, growth and expiry.

    Parameters
    ----------
    dim
        Width of every row.
    generator
        The random source for row initialisation (owned by the learner: deterministic).
    initial_rows, max_rows
        Starting capacity, and the cap that growth (doubling) stops at.
    expire_after
        Free rows whose key was not seen for this many steps (``None``: never).
    init_std
        Standard deviation of a new row.
    init_accum
        Starting value of a new row's Adagrad accumulator: with it a row's first steps are
        proportional to its gradient (like FTRL's ``beta``), not a full ``lr`` whatever
        the evidence - the difference between learning a rare id and memorising noise.
    """

    def __init__(
        self,
        dim: int,
        generator: torch.Generator,
        *,
        initial_rows: int = 4096,
        max_rows: int = 1 << 22,
        expire_after: int | None = None,
        init_std: float = 0.05,
        init_accum: float = 0.0,
    ) -> None:
        if initial_rows < 1 or max_rows < initial_rows:
            raise ValueError(f"need 1 <= initial_rows <= max_rows, got {initial_rows}, {max_rows}")
        self.dim = dim
        self.generator = generator
        self.max_rows = max_rows
        self.expire_after = expire_after
        self.init_std = init_std
        self.init_accum = init_accum
        self.weight = torch.zeros(initial_rows, dim)
        self.accum = torch.zeros(initial_rows, dim)
        self.last_seen = np.zeros(initial_rows, dtype=np.int64)
        self.live = np.zeros(initial_rows, dtype=bool)
        self.row_owner: list[tuple[str, Any] | None] = [None] * initial_rows
        self.tables: dict[str, dict[Any, int]] = {}
        self.free: list[int] = []
        self.next_row = 0
        self.evicted = 0
        self.expired = 0
        self.releases = 0
        self._pending: list[int] = []

    def __len__(self) -> int:
        return self.next_row - len(self.free)

    @property
    def capacity(self) -> int:
        return self.weight.shape[0]

    def table(self, field: str) -> dict[Any, int]:
        """The key -> row dict of one field (created on first use)."""
        t = self.tables.get(field)
        if t is None:
            t = self.tables[field] = {}
        return t

    def allocate(self, field: str, key: Any) -> int:
        """A fresh row for ``key`` of ``field``: reused, new, after growth, or evicted."""
        if self.free:
            row = self.free.pop()
        else:
            if self.next_row == self.capacity:
                if self.capacity < self.max_rows:
                    self._grow(min(self.max_rows, 2 * self.capacity))
                else:
                    self._evict_oldest(max(1, self.capacity // 16))
            if self.free:
                row = self.free.pop()
            else:
                row = self.next_row
                self.next_row += 1
        self.tables[field][key] = row
        self.row_owner[row] = (field, key)
        self.live[row] = True
        self._pending.append(row)
        return row

    def init_pending(self, step: int) -> None:
        """Initialise the rows allocated since the last call (in allocation order)."""
        if not self._pending:
            return
        rows = torch.tensor(self._pending, dtype=torch.long)
        self._pending = []
        self.weight[rows] = torch.randn(len(rows), self.dim, generator=self.generator) * self.init_std
        self.accum[rows] = self.init_accum
        self.last_seen[rows.numpy()] = step

    def touch(self, rows: np.ndarray, step: int) -> None:
        self.last_seen[rows] = step

    def expire(self, step: int) -> int:
        """Free every row unseen for more than ``expire_after`` steps; returns the count."""
        if self.expire_after is None:
            return 0
        n = self.next_row
        stale = np.flatnonzero(self.live[:n] & (self.last_seen[:n] < step - self.expire_after))
        self._release(stale)
        self.expired += len(stale)
        return len(stale)

    def _release(self, rows: np.ndarray) -> None:
        if len(rows):
            self.releases += 1
        for r in rows.tolist():
            owner = self.row_owner[r]
            if owner is not None:
                del self.tables[owner[0]][owner[1]]
                self.row_owner[r] = None
                self.live[r] = False
                self.free.append(r)

    def _evict_oldest(self, n: int) -> None:
        live = np.flatnonzero(self.live[: self.next_row])
        order = live[np.argsort(self.last_seen[live], kind="stable")[:n]]
        self._release(order)
        self.evicted += len(order)
        logger.info("embedding store full at %d rows: evicted the %d least recently seen", self.capacity, len(order))

    def _grow(self, new_rows: int) -> None:
        old = self.capacity
        for name in ("weight", "accum"):
            t = getattr(self, name)
            grown = torch.zeros(new_rows, self.dim)
            grown[:old] = t
            setattr(self, name, grown)
        last = np.zeros(new_rows, dtype=np.int64)
        last[:old] = self.last_seen
        self.last_seen = last
        live = np.zeros(new_rows, dtype=bool)
        live[:old] = self.live
        self.live = live
        self.row_owner.extend([None] * (new_rows - old))

    def gather(self, rows: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        """The rows ``rows`` (U,) as a (U, dim) leaf tensor (a copy)."""
        sub = self.weight.index_select(0, rows)
        return sub.requires_grad_(requires_grad)

    def adagrad_(self, rows: torch.Tensor, grad: torch.Tensor, lr: float, eps: float = 1e-8) -> None:
        """Sparse Adagrad on the unique rows ``rows`` (U,) with their gradient (U, dim):
        ``acc += g^2; w -= lr * g / sqrt(acc)`` (``grad`` is consumed)."""
        acc = self.accum.index_select(0, rows).add_(grad * grad)
        self.accum.index_copy_(0, rows, acc)
        upd = grad.div_(acc.sqrt_().add_(eps)).mul_(lr)
        self.weight.index_add_(0, rows, upd, alpha=-1.0)

    def state_dict(self) -> dict[str, Any]:
        n = self.capacity
        return {
            "dim": self.dim,
            "weight": self.weight[:n].clone(),
            "accum": self.accum[:n].clone(),
            "last_seen": self.last_seen.copy(),
            "tables": {f: dict(t) for f, t in self.tables.items()},
            "free": list(self.free),
            "next_row": self.next_row,
            "evicted": self.evicted,
            "expired": self.expired,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["dim"] != self.dim:
            raise ValueError(f"embedding width {state['dim']} in the state, {self.dim} in this learner")
        self.weight = state["weight"].clone()
        self.accum = state["accum"].clone()
        self.last_seen = np.array(state["last_seen"], dtype=np.int64)
        self.tables = {f: dict(t) for f, t in state["tables"].items()}
        self.row_owner = [None] * self.capacity
        self.live = np.zeros(self.capacity, dtype=bool)
        for f, t in self.tables.items():
            for k, r in t.items():
                self.row_owner[r] = (f, k)
                self.live[r] = True
        self.free = list(state["free"])
        self.next_row = int(state["next_row"])
        self.evicted = int(state["evicted"])
        self.expired = int(state["expired"])
        self.releases += 1
        self._pending = []


@dataclass(frozen=True)
class TowerIndex:
    """One tower's bags, field-major: bag ``f * B + b`` holds field ``f`` of example ``b``.

    ``inverse`` (N,) indexes the batch's unique rows, ``offsets`` (F*B,) is where each bag starts.
    """

    inverse: torch.Tensor
    offsets: torch.Tensor
    batch_size: int
    n_fields: int


@dataclass(frozen=True)
class EncodedBatch:
    """A batch of examples as rows. With ``unique`` encoding (learning), ``rows`` (U,) are
    the unique store rows of both towers and each tower's ``inverse`` indexes them; without
    (inference), ``rows`` is ``None`` and ``inverse`` holds store rows directly.
    ``user_keys`` / ``item_keys``: the ids of each side (``None`` where absent)."""

    rows: torch.Tensor | None
    user: TowerIndex | None
    item: TowerIndex | None
    user_keys: list[Any]
    item_keys: list[Any]


_EMPTY: tuple[int, ...] = ()
_NO_ROW = -1


@dataclass(frozen=True)
class ColumnBags:
    """One tower's bags over N examples encoded from columns, kept per field so that any
    range of examples cuts into a :class:`TowerIndex` (:meth:`index`).

    ``flats[f]`` holds the rows of field ``f`` of all examples back to back, ``lengths[f]``
    (N,) each example's bag length and ``ends[f]`` (N+1,) the cumulative lengths.
    """

    flats: tuple[np.ndarray, ...]
    lengths: tuple[np.ndarray, ...]
    ends: tuple[np.ndarray, ...]
    size: int

    def __len__(self) -> int:
        return self.size

    def index(self, lo: int = 0, hi: int | None = None) -> TowerIndex:
        """The field-major :class:`TowerIndex` of examples ``lo:hi`` (store rows, as
        :meth:`FeatureEncoder.encode` gives with ``unique=False``)."""
        hi = self.size if hi is None else hi
        flat = np.concatenate([f[e[lo]:e[hi]] for f, e in zip(self.flats, self.ends)])
        lengths = np.concatenate([ln[lo:hi] for ln in self.lengths])
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return TowerIndex(torch.from_numpy(flat), torch.from_numpy(offsets), hi - lo, len(self.flats))


class _BagTable:
    """The complete bags of one field's values, numbered: ``codes`` value -> code; per code
    its first row (-1: empty), length and start in the flat row array. Code 0 is ``None``.
    Bags appended past :meth:`mark` without numbering serve one call, then :meth:`reset`."""

    def __init__(self) -> None:
        self.codes: dict[Any, int] = {None: 0}
        self.n = 1
        self.n_flat = 0
        self.max_len = 0
        self._row0 = np.full(64, _NO_ROW, dtype=np.int64)
        self._length = np.zeros(64, dtype=np.int64)
        self._start = np.zeros(64, dtype=np.int64)
        self._flat = np.zeros(64, dtype=np.int64)

    @staticmethod
    def _fit(a: np.ndarray, n: int, fill: int = 0) -> np.ndarray:
        if n <= len(a):
            return a
        grown = np.full(max(n, 2 * len(a)), fill, dtype=a.dtype)
        grown[: len(a)] = a
        return grown

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Append the bags ``flat`` cut by ``lengths`` (K,); returns their codes (K,)."""
        c0, f0, k, total = self.n, self.n_flat, len(lengths), len(flat)
        self._row0 = self._fit(self._row0, c0 + k, _NO_ROW)
        self._length = self._fit(self._length, c0 + k)
        self._start = self._fit(self._start, c0 + k)
        self._flat = self._fit(self._flat, f0 + total)
        starts = np.cumsum(lengths) - lengths
        nz = lengths > 0
        row0 = np.full(k, _NO_ROW, dtype=np.int64)
        row0[nz] = flat[starts[nz]]
        self._row0[c0: c0 + k] = row0
        self._length[c0: c0 + k] = lengths
        self._start[c0: c0 + k] = starts + f0
        self._flat[f0: f0 + total] = flat
        self.n += k
        self.n_flat += total
        if k:
            self.max_len = max(self.max_len, int(lengths.max()))
        return np.arange(c0, c0 + k, dtype=np.int64)

    def mark(self) -> tuple[int, int, int]:
        return self.n, self.n_flat, self.max_len

    def reset(self, mark: tuple[int, int, int]) -> None:
        self.n, self.n_flat, self.max_len = mark

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row0, length, start, flat) over the codes."""
        return self._row0[: self.n], self._length[: self.n], self._start[: self.n], self._flat[: self.n_flat]


_PLAIN_KEYS = frozenset((str, int))  # types that are their own feature_key
_PLAIN_OR_NONE = frozenset((str, int, type(None)))
_TUPLES_OR_NONE = frozenset((tuple, type(None)))
_NONE_AS_EMPTY: dict[Any, tuple[()]] = {None: ()}


def _element_keys(values: list[Any]) -> tuple[list[Any], np.ndarray]:
    """The feature keys of each value's elements, back to back, and their counts (K,):
    one element for a single value, the members of a tuple or list."""
    types = set(map(type, values))
    if types <= _PLAIN_KEYS:
        return values, np.ones(len(values), dtype=np.int64)
    if types <= {tuple}:
        keys = list(chain.from_iterable(values))
        if not set(map(type, keys)) <= _PLAIN_KEYS:
            keys = list(map(feature_key, keys))
        return keys, np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    keys, counts = [], []
    for v in values:
        elems = v if isinstance(v, (tuple, list)) else (v,)
        keys.extend(map(feature_key, elems))
        counts.append(len(elems))
    return keys, np.array(counts, dtype=np.int64)


def _single_bags(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat rows, lengths, ends) of bags of at most one row each: ``rows`` (N,), -1 for none."""
    ends = np.zeros(len(rows) + 1, dtype=np.int64)
    present = rows >= 0
    if present.all():
        ends[1:] = np.arange(1, len(rows) + 1)
        return rows, np.ones(len(rows), dtype=np.int64), ends
    lengths = present.astype(np.int64)
    np.cumsum(lengths, out=ends[1:])
    return rows[present], lengths, ends


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _plain(col: Any) -> Sequence[Any]:
    """A column as a sequence of Python values (numpy arrays give their ``tolist``)."""
    return col.tolist() if isinstance(col, np.ndarray) else col


def _values(xs: Sequence[Mapping[str, Any]], field: str) -> list[Any]:
    """``[x.get(field) for x in xs]``, with C loops when the examples are plain dicts, and
    straight from the columns of a :class:`~learners.base.ColumnExamples`."""
    return field_values(xs, field)


class FeatureEncoder:
    """Turns examples into :class:`EncodedBatch` es over one :class:`EmbeddingStore`.

    The hot path is per field, not per example, and its loops run in C: the column of
    values is pulled out with ``map(dict.get, ...)``, then mapped through a per-field
    *row cache* (value -> row, ``None`` -> -1) straight into a numpy array. A column
    holding something the row cache does not know - a new key, a multi-valued tuple, an
    unknown key at prediction time - takes the general path: a per-field *bag cache*
    (value -> tuple of rows) and, for values in neither cache, the id table (the slow
    path, once per new value). Both caches are dropped whenever the store frees rows.

    Inference over a catalogue takes columns instead (:meth:`encode_columns`, what
    ``encode_items`` runs): no per-example dicts, each column read straight from the id
    tables or through per-value codes, bags built with numpy (:class:`ColumnBags`).
    """

    def __init__(self, store: EmbeddingStore, user_fields: Sequence[str], item_fields: Sequence[str]) -> None:
        if not user_fields or user_fields[0] != "user_id" or not item_fields or item_fields[0] != "item_id":
            raise ValueError("user_fields must start with 'user_id' and item_fields with 'item_id'")
        self.store = store
        self.user_fields = tuple(user_fields)
        self.item_fields = tuple(item_fields)
        self._bags: dict[str, dict[Any, tuple[int, ...]]] = {}
        self._rows: dict[str, dict[Any, int]] = {}
        self._tables: dict[str, _BagTable] = {}
        self._cache_release = store.releases

    def _drop_stale_caches(self) -> None:
        if self._cache_release != self.store.releases:
            self._bags.clear()
            self._rows.clear()
            self._tables.clear()
            self._cache_release = self.store.releases

    def _resolve(self, field: str, value: Any, insert: bool) -> tuple[int, ...]:
        """The bag of ``value`` from the id table (allocating when ``insert``); cached when complete."""
        store = self.store
        table = store.table(field)
        multi = isinstance(value, (tuple, list))
        rows = []
        complete = True
        for v in value if multi else (value,):
            k = feature_key(v)
            r = table.get(k)
            if r is None:
                if not insert:
                    complete = False
                    continue
                r = store.allocate(field, k)
            rows.append(r)
        bag = tuple(rows)
        if complete:
            try:
                self._bags[field][value] = bag
                if not multi:
                    self._rows[field][value] = bag[0]
            except TypeError:  # an unhashable value (a list): not cached
                pass
        return bag

    def _column(self, xs: Sequence[Mapping[str, Any]], field: str, insert: bool) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """(values, flat rows, bag lengths) of one field over ``xs``; the values only for
        the id fields (``None`` otherwise, when the fast path answered)."""
        rcache = self._rows.get(field)
        if rcache is None:
            rcache = self._rows[field] = {None: _NO_ROW}
            self._bags[field] = {None: _EMPTY}
        col = _values(xs, field) if field in ("user_id", "item_id") or hasattr(xs, "column") else None
        try:
            values = col if col is not None else map(dict.get, xs, repeat(field))
            rows = np.fromiter(map(rcache.__getitem__, values), dtype=np.int64, count=len(xs))
        except (KeyError, TypeError):  # a value the row cache does not know, or not plain dicts
            pass
        else:
            present = rows >= 0
            if present.all():
                return col, rows, np.ones(len(xs), dtype=np.int64)
            return col, rows[present], present.astype(np.int64)
        if col is None:
            col = _values(xs, field)
        bcache = self._bags[field]
        try:
            bags = list(map(bcache.__getitem__, col))
        except (KeyError, TypeError):
            bags = []
            for v in col:
                b = bcache.get(v) if v.__hash__ is not None else None
                bags.append(b if b is not None else self._resolve(field, v, insert))
        lengths = np.fromiter(map(len, bags), dtype=np.int64, count=len(bags))
        flat = np.fromiter(chain.from_iterable(bags), dtype=np.int64, count=int(lengths.sum()))
        return col, flat, lengths

    def _side(self, xs: Sequence[Mapping[str, Any]], fields: tuple[str, ...], insert: bool
              ) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """(ids, flat rows, bag lengths) of one tower, field-major."""
        ids: list[Any] = []
        flats, lengths = [], []
        for f in fields:
            col, flat, ln = self._column(xs, f, insert)
            if not ids:
                ids = col
            flats.append(flat)
            lengths.append(ln)
        return ids, np.concatenate(flats), np.concatenate(lengths)

    def encode(self, user_xs: Sequence[Mapping[str, Any]] | None, item_xs: Sequence[Mapping[str, Any]] | None,
               *, insert: bool, step: int = 0, unique: bool = True) -> EncodedBatch:
        """Rows of the user side of ``user_xs`` and the item side of ``item_xs`` (either may
        be ``None``). ``insert`` allocates rows for unknown keys (learning); otherwise
        unknown keys are left out of their bags (prediction never grows the tables).
        ``unique=False`` skips de-duplication (inference reads the store directly)."""
        empty = np.zeros(0, dtype=np.int64)
        while True:
            self._drop_stale_caches()
            user_keys, uflat, ulen = self._side(user_xs, self.user_fields, insert) if user_xs is not None else ([], empty, empty)
            item_keys, iflat, ilen = self._side(item_xs, self.item_fields, insert) if item_xs is not None else ([], empty, empty)
            if self._cache_release == self.store.releases:
                break  # no row was freed while encoding: every row above is current
        self.store.init_pending(step)
        all_rows = np.concatenate([uflat, iflat])
        if unique:
            uniq, inverse = np.unique(all_rows, return_inverse=True)
            if insert:
                self.store.touch(uniq, step)
            rows = torch.from_numpy(uniq)
            inv = torch.from_numpy(inverse.reshape(-1).astype(np.int64, copy=False))
        else:
            rows, inv = None, torch.from_numpy(all_rows)

        def index(lengths: np.ndarray, lo: int, hi: int, b: int, n_fields: int) -> TowerIndex:
            offsets = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=offsets[1:])
            return TowerIndex(inv[lo:hi], torch.from_numpy(offsets), b, n_fields)

        n_user = len(uflat)
        return EncodedBatch(
            rows=rows,
            user=index(ulen, 0, n_user, len(user_xs), len(self.user_fields)) if user_xs is not None else None,
            item=index(ilen, n_user, len(all_rows), len(item_xs), len(self.item_fields)) if item_xs is not None else None,
            user_keys=user_keys,
            item_keys=item_keys,
        )

    # ------------------------------------------------------------------ columns (inference)
    def _new_codes(self, field: str, t: _BagTable, values: list[Any]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Codes of ``values`` (hashable, none of them coded yet), resolved once per distinct
        value and in bulk: complete bags are numbered for good; bags with unknown keys
        are appended after the returned mark, for this call only (a key learned later
        must count), and an all-unknown bag is code 0 (empty)."""
        distinct = list(dict.fromkeys(values))
        keys, counts = _element_keys(distinct)
        table = self.store.tables.get(field, {})
        rows = np.fromiter(map(table.get, keys, repeat(_NO_ROW)), dtype=np.int64, count=len(keys))
        known = rows >= 0
        ends = np.zeros(len(distinct) + 1, dtype=np.int64)
        np.cumsum(counts, out=ends[1:])
        n_known = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(known, out=n_known[1:])
        n_known = n_known[ends[1:]] - n_known[ends[:-1]]
        complete = n_known == counts
        per_elem = np.repeat(complete, counts)
        codes = np.zeros(len(distinct), dtype=np.int64)
        codes[complete] = t.add(rows[per_elem], counts[complete])
        t.codes.update(zip(compress(distinct, complete), codes[complete].tolist()))
        mark = t.mark()
        partial = ~complete & (n_known > 0)
        if partial.any():
            codes[partial] = t.add(rows[np.repeat(partial, counts) & known], n_known[partial])
        by_value = dict(zip(distinct, codes.tolist()))
        return np.fromiter(map(by_value.__getitem__, values), dtype=np.int64, count=len(values)), mark

    def _field_bags(self, field: str, col: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat rows, bag lengths (N,), cumulative ends (N+1,)) of one column of N values.

        Strings and integers are their own keys: a column of them (or of tuples of them),
        ``None`` where missing, is read straight from the id table, one dict lookup per
        value in C - nothing cached, so nothing to go stale. Other columns (numbers as
        categories, mixed values) go through the field's :class:`_BagTable`: one lookup
        maps a value to its code, values without one are resolved in bulk
        (:meth:`_new_codes`), once per distinct value. Lists read as the tuples they hold.
        """
        n = len(col)
        types = set(map(type, col))
        if types <= _PLAIN_OR_NONE:
            table = self.store.tables.get(field, {})
            return _single_bags(np.fromiter(map(table.get, col, repeat(_NO_ROW)), dtype=np.int64, count=n))
        if types <= _TUPLES_OR_NONE:
            if type(None) in types:
                col = list(map(_NONE_AS_EMPTY.get, col, col))
            keys = list(chain.from_iterable(col))
            if set(map(type, keys)) <= _PLAIN_KEYS:
                table = self.store.tables.get(field, {})
                rows = np.fromiter(map(table.get, keys, repeat(_NO_ROW)), dtype=np.int64, count=len(keys))
                lengths = np.fromiter(map(len, col), dtype=np.int64, count=n)
                ends = np.zeros(n + 1, dtype=np.int64)
                known = rows >= 0
                if known.all():
                    np.cumsum(lengths, out=ends[1:])
                    return rows, lengths, ends
                n_known = np.zeros(len(keys) + 1, dtype=np.int64)
                np.cumsum(known, out=n_known[1:])
                np.cumsum(lengths, out=ends[1:])
                ends = n_known[ends]
                return rows[known], np.diff(ends), ends
        t = self._tables.get(field)
        if t is None:
            t = self._tables[field] = _BagTable()
        get = t.codes.get
        try:
            codes = np.fromiter(map(get, col, repeat(-1)), dtype=np.int64, count=n)
        except TypeError:  # unhashable values: lists read as tuples, the rest one by one below
            col = [tuple(v) if type(v) is list else v for v in col]
            codes = np.fromiter((get(v, -1) if _hashable(v) else -2 for v in col), dtype=np.int64, count=n)
        mark = t.mark()
        miss = np.flatnonzero(codes == -1)
        if len(miss):
            codes[miss], mark = self._new_codes(field, t, list(map(col.__getitem__, miss.tolist())))
        odd = np.flatnonzero(codes == -2)
        if len(odd):  # unhashable even as tuples: one by one, never numbered
            table = self.store.tables.get(field, {})
            for i in odd.tolist():
                bag = [r for r in map(table.get, _element_keys([col[i]])[0]) if r is not None]
                codes[i] = t.add(np.array(bag, dtype=np.int64), np.array([len(bag)], dtype=np.int64))[0]
        row0, length, start, flat = t.arrays()
        single = t.max_len <= 1
        t.reset(mark)  # drop this call's bags (they stay readable until the next add)
        if single:  # at most one row per value
            return _single_bags(row0[codes])
        ends = np.zeros(n + 1, dtype=np.int64)
        lengths = length[codes]
        np.cumsum(lengths, out=ends[1:])
        idx = np.repeat(start[codes] - ends[:-1], lengths) + np.arange(int(ends[-1]), dtype=np.int64)
        return flat[idx], lengths, ends

    def encode_columns(self, ids: Sequence[Any], columns: Mapping[str, Sequence[Any]],
                       side: Literal["user", "item"] = "item") -> ColumnBags:
        """Bags of one tower over N examples given as columns: the same rows
        :meth:`encode` gives the examples ``{"item_id": ids[n], **{f: columns[f][n]}}``
        (``insert=False, unique=False``).

        ``ids`` (N,) are the user or item ids; ``columns`` maps a field (``i:tags``) to its
        (N,) values: a tuple for a multi-valued field, ``None`` where missing. The tower's
        fields absent from ``columns`` read as missing, other columns are ignored. Never
        grows the tables: unknown ids and values read as empty, as in :meth:`encode`.

        >>> import torch
        >>> store = EmbeddingStore(dim=2, generator=torch.Generator().manual_seed(0))
        >>> enc = FeatureEncoder(store, ("user_id",), ("item_id", "i:tags"))
        >>> _ = enc.encode(None, [{"item_id": "a", "i:tags": ("x", "y")}], insert=True)
        >>> bags = enc.encode_columns(["a", "new"], {"i:tags": [("x", "y"), ("y", "z")]})
        >>> bags.index().offsets.tolist(), len(bags.index().inverse)
        ([0, 1, 1, 3], 4)
        """
        fields = self.item_fields if side == "item" else self.user_fields
        n = len(ids)
        for f, col in columns.items():
            if len(col) != n:
                raise ValueError(f"column {f!r} has {len(col)} values for {n} ids")
        self._drop_stale_caches()
        flats, lengths, ends = [], [], []
        for f in fields:
            col = ids if f == fields[0] else columns.get(f)
            flat, ln, end = self._field_bags(f, _plain(col) if col is not None else [None] * n)
            flats.append(flat)
            lengths.append(ln)
            ends.append(end)
        return ColumnBags(tuple(flats), tuple(lengths), tuple(ends), n)
