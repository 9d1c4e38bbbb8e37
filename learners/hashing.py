"""Feature hashing: map examples ``x`` to sparse rows of ``2**bits`` buckets, fast and stably.

Every feature becomes one or more *tokens*:

* a string ``v`` of feature ``name`` -> token ``"name=v"``, value 1;
* a tuple of strings (multi-valued) -> one token per element, value 1 each;
* an int of a feature listed in ``categorical`` (by default ``ctx:position``) -> ``"name=v"``;
* any other number -> token ``"name"`` with the number as its value;
* a *cross* of two fields (patterns in ``crosses``, e.g. ``("user_id", "i:*")``) -> one
  token per pair of their tokens within the example, value the product of their values.

A token's 64-bit key is ``crc32(name) << 32 | crc32(value)`` for a string value (an
integer category uses the integer itself in the low half; a plain number a fixed low
half) - ``zlib.crc32`` of UTF-8 text, never Python's salted ``hash()``. A cross's key
combines its two tokens' keys (``a * K + b + K``, wrapping), and the bucket is the top
``bits`` bits of ``key * 0x9E3779B97F4A7C15`` (Fibonacci hashing). Bucket indices
therefore depend on nothing but the text: they are identical in every process, which is
what lets a checkpoint be restored elsewhere.

Speed: value codes are cached in one dict (value -> code, independent of the field), so
when the examples of a batch share their fields, one C-level ``map`` looks up every
feature of the batch; keys, multi-valued features, crosses and buckets are then computed
on the (B, fields) matrix with a fixed number of numpy operations.

>>> h = FeatureHasher(bits=18)
>>> x = {"user_id": "u1", "item_id": "i7", "u:age": "25-34", "i:genres": ("Drama", "War"),
...      "ctx:position": 2}
>>> batch = h.transform([x])
>>> batch.n_rows, len(batch.cols)   # 6 tokens + 2 user_id crosses + 2 u:age crosses
(1, 10)
>>> bool((batch.cols < 2**18).all() and (batch.cols == h.transform([dict(x)]).cols).all())
True
"""

from __future__ import annotations

import fnmatch
import zlib
from itertools import chain
from operator import itemgetter
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from learners.base import CTX_PREFIX, X, columns_to_xs, prefixed_names
from streams.columns import EventColumns

__all__ = ["FeatureHasher", "HashedBatch", "DEFAULT_CROSSES", "stable_hash", "feature_tokens"]

#: Crosses used when none are given: each user id with every item feature, and every
#: user feature with every item feature.
DEFAULT_CROSSES: tuple[tuple[str, str], ...] = (("user_id", "i:*"), ("u:*", "i:*"))
_EXCLUDE_DEFAULT: tuple[str, ...] = ("ctx:event_time",)

_GOLD = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
_CROSS = np.uint64(0xBF58476D1CE4E5B9)  # mixes the first token of a cross (odd)
_LOW32 = (1 << 32) - 1
_NUMBER_LOW = np.uint64(0x9E3779B9)  # low half of the key of a plain number's token


def stable_hash(token: str) -> int:
    """The 32-bit hash of a token: ``zlib.crc32`` of its UTF-8 bytes (same in every process).

    >>> stable_hash("user_id=u1") == stable_hash("user_id=" + "u1")
    True
    """
    return zlib.crc32(token.encode("utf-8"))


def feature_tokens(name: str, value: Any, categorical: Iterable[str] = ("ctx:position",)) -> list[tuple[str, float]]:
    """The ``(token, value)`` pairs of one feature (shared by the hashed and River LR).

    >>> feature_tokens("i:genres", ("Drama", "War"))
    [('i:genres=Drama', 1.0), ('i:genres=War', 1.0)]
    >>> feature_tokens("u:age", 31), feature_tokens("ctx:position", 3)
    ([('u:age', 31.0)], [('ctx:position=3', 1.0)])
    """
    if isinstance(value, str):
        return [(f"{name}={value}", 1.0)]
    if isinstance(value, (tuple, list)):
        return [(f"{name}={v}", 1.0) for v in value]
    if isinstance(value, (int, float, np.integer, np.floating)):
        if name in categorical and float(value).is_integer():
            return [(f"{name}={int(value)}", 1.0)]
        return [(name, float(value))]
    raise TypeError(
        f"feature {name!r} has a value of type {type(value).__name__}; "
        "use a string, a number or a tuple of strings"
    )


@dataclass(frozen=True)
class HashedBatch:
    """A batch of hashed examples as a sparse COO matrix of shape ``(n_rows, 2**bits)``.

    ``rows`` (N,) int64 are row numbers (in no particular order), ``cols`` (N,) int64
    bucket indices, ``vals`` (N,) float64 feature values. Duplicate entries add up.
    """

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    n_rows: int


# A value's code (one int64, the same in every field):
#   a string        -> crc32 of its UTF-8 bytes                       (< 2**32)
#   an int |v|<2**31 -> _INT | (v & 0xFFFFFFFF)
#   a tuple/list    -> _MULTI | index of its group (the crc32 of each element)
#   other numbers   -> _NUMBER, the value itself appended to a side list (never cached)
_INT = 1 << 60
_MULTI = 1 << 61
_NUMBER = 1 << 62


class _ValueCache(dict):
    """``value -> code``; a miss asks the hasher (``__missing__`` is called from C)."""

    __slots__ = ("miss",)

    def __missing__(self, value: Any) -> int:
        if type(value) is str:  # the common case, without two more Python calls
            code = self[value] = zlib.crc32(value.encode("utf-8"))
            return code
        return self.miss(value)


class _Part(NamedTuple):
    """The tokens of one field (or cross) in a batch: ``rows``, uint64 ``keys``, ``vals``."""

    rows: np.ndarray
    keys: np.ndarray
    vals: np.ndarray | None  # None: all 1


class _Layout(NamedTuple):
    """What a batch whose examples have fields ``names`` (in this order) needs."""

    used: list[int]  # indices into names of the fields hashed (not excluded)
    field_keys: np.ndarray  # (len(used),) uint64: crc32(name) << 32
    categorical: np.ndarray  # (len(used),) bool
    pairs: list[tuple[int, int]]  # crosses, as positions in `used`


def _scalar_keys(
    field_keys: np.ndarray, categorical: np.ndarray, codes: np.ndarray, numbers: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Keys (uint64) and values (None: all 1) of codes without _MULTI.

    ``field_keys`` and ``categorical`` broadcast against ``codes`` (one per column of a
    (B, fields) matrix, or scalars); ``numbers`` holds the number where a code has
    _NUMBER. An integer category keeps the integer (its low 32 bits) as the low half of
    its key, which the code already holds.
    """
    keys = field_keys | (codes & _LOW32).view(np.uint64)
    is_int = (codes & _INT) != 0
    is_num = (codes & _NUMBER) != 0
    any_num = bool(is_num.any())
    if not (any_num or is_int.any()):
        return keys, None
    plain = is_int & ~categorical  # integers of numeric fields are values
    if any_num:
        whole = is_num & (numbers == np.floor(numbers)) & (np.abs(numbers) < 2.0**63)
        category = whole & categorical
        as_int = np.where(category, numbers, 0.0).astype(np.int64)
        keys = np.where(category, field_keys | (as_int & _LOW32).view(np.uint64), keys)
        plain |= is_num & ~category
    if not plain.any():
        return keys, None
    low = codes & _LOW32
    value = np.where(is_num, numbers, ((low ^ 0x80000000) - 0x80000000).astype(np.float64))
    keys = np.where(plain, field_keys | _NUMBER_LOW, keys)
    return keys, np.where(plain, value, 1.0)


def _cross(a: _Part, b: _Part, n_rows: int, *, dense_a: bool, dense_b: bool) -> _Part:
    """The cross of two fields' tokens: every pair within a row. A *dense* part has exactly
    one token per row, in row order; otherwise rows are non-decreasing."""
    if dense_a and dense_b:
        ia = ib = None
        rows = a.rows
    elif dense_a:
        ia, ib, rows = b.rows, None, b.rows
    elif dense_b:
        ia, ib, rows = None, a.rows, a.rows
    else:
        ia, ib = _join_rows(a.rows, b.rows, n_rows)
        rows = a.rows[ia]
    ka = a.keys if ia is None else a.keys[ia]
    kb = b.keys if ib is None else b.keys[ib]
    va = None if a.vals is None else (a.vals if ia is None else a.vals[ia])
    vb = None if b.vals is None else (b.vals if ib is None else b.vals[ib])
    vals = va if vb is None else (vb if va is None else va * vb)
    return _Part(rows, ka * _CROSS + kb + _CROSS, vals)


def _join_rows(rows_a: np.ndarray, rows_b: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` with ``rows_a[i] == rows_b[j]``; both non-decreasing."""
    count_b = np.bincount(rows_b, minlength=n_rows)
    start_b = np.cumsum(count_b) - count_b
    rep = count_b[rows_a]
    total = int(rep.sum())
    ia = np.repeat(np.arange(len(rows_a), dtype=np.int64), rep)
    first = np.cumsum(rep) - rep
    ib = np.repeat(start_b[rows_a] - first, rep) + np.arange(total, dtype=np.int64)
    return ia, ib


_NO_OWNER = -2  # neither a block id nor NO_BLOCK (-1, whose slot is the last one)


class _BlockTable:
    """The value codes of interned feature mappings with one set of names, direct-mapped:
    block ``b`` lives in slot ``b % slots`` (``owner`` says which block a slot holds). Block
    ids are handed out in sequence, so the mappings in use sit in distinct slots unless
    more than ``slots`` of them are live; a slot taken over is recomputed on its next use."""

    def __init__(self, width: int, slots: int) -> None:
        self.mask = slots - 1
        self.owner = np.full(slots, _NO_OWNER, dtype=np.int64)
        self.codes = np.zeros((slots, width), dtype=np.int64)
        self.numbers = np.zeros((slots, width))


class FeatureHasher:
    """Hash examples into ``2**bits`` buckets with field crosses (see the module docstring).

    Parameters
    ----------
    bits
        Number of hash bits; indices are in ``[0, 2**bits)``.
    crosses
        Pairs of field-name patterns (``fnmatch`` style) to cross; ``None`` for
        :data:`DEFAULT_CROSSES`, ``()`` for none. Each pair crosses every field matching
        the first pattern with every other field matching the second.
    categorical
        Numeric fields whose integer values are categories (one token per value).
    exclude
        Fields ignored entirely (by default ``ctx:event_time``, which the CTR learner may
        use for its decay and which is never a model feature).
    max_cache
        Number of cached values; the cache is cleared when it grows past it. It holds no
        state (codes are recomputed identically), it only saves time.
    block_slots
        Slots (a power of two) of the tables that keep the codes of interned feature
        mappings (:class:`~streams.columns.FeatureBlocks`) per (side, names) for
        :meth:`transform_columns` (again: time, not state).
    """

    def __init__(
        self,
        bits: int = 20,
        crosses: Sequence[Sequence[str]] | None = None,
        categorical: Sequence[str] = ("ctx:position",),
        exclude: Sequence[str] = _EXCLUDE_DEFAULT,
        max_cache: int = 1_000_000,
        block_slots: int = 1 << 16,
    ) -> None:
        if not 1 <= int(bits) <= 31:
            raise ValueError(f"bits must be in 1..31, got {bits}")
        self.bits = int(bits)
        self.crosses = tuple(tuple(p) for p in (DEFAULT_CROSSES if crosses is None else crosses))
        for pair in self.crosses:
            if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ValueError(f"each cross must be a pair of field-name patterns, got {pair!r}")
        self.categorical = frozenset(categorical)
        self.exclude = frozenset(exclude)
        self.max_cache = int(max_cache)
        if block_slots < 1 or block_slots & (block_slots - 1):
            raise ValueError(f"block_slots must be a power of two, got {block_slots}")
        self.block_slots = int(block_slots)
        self._block_tables: dict[tuple[str, tuple[str, ...]], _BlockTable] = {}
        self._shift = np.uint64(64 - self.bits)
        self._cache = _ValueCache()
        self._cache.miss = self._miss
        self._numbers: list[float] = []  # values of the uncached numbers met by a lookup
        self._groups: list[tuple[int, ...]] = [()]
        self._group_arrays = self._no_groups()
        self._layouts: dict[tuple[str, ...], _Layout] = {}

    @property
    def n_buckets(self) -> int:
        return 1 << self.bits

    # -- values and layouts -------------------------------------------------------------------

    def _miss(self, value: Any) -> int:
        """The code of a value (see the table above); cached unless it is a plain number."""
        if isinstance(value, str):
            code = stable_hash(value)
        elif isinstance(value, (bool, int, np.integer)) and -(1 << 31) <= value < (1 << 31):
            code = _INT | (int(value) & _LOW32)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            if not np.isfinite(float(value)):
                raise ValueError(f"a numeric feature must be finite, got {value!r}")
            self._numbers.append(float(value))
            return _NUMBER
        elif isinstance(value, (tuple, list)):
            for v in value:
                if not isinstance(v, str):
                    raise TypeError(f"a multi-valued feature holds strings, got {type(v).__name__} in {value!r}")
            code = _MULTI | len(self._groups)
            self._groups.append(tuple(stable_hash(v) for v in value))
        else:
            raise TypeError(
                f"a feature value has type {type(value).__name__} ({value!r}); "
                "use a string, a number or a tuple of strings"
            )
        if isinstance(value, list):
            return code  # unhashable: not cached
        self._cache[value] = code
        return code

    def _code(self, name: str, value: Any) -> int:
        """The code of one value of field ``name``; a bad value's error names the field."""
        try:
            try:
                return self._cache[value]
            except TypeError:  # unhashable (a list is fine, a dict is not) or a bad value
                return self._miss(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"feature {name!r}: {exc}") from None

    def _layout(self, names: tuple[str, ...]) -> _Layout:
        layout = self._layouts.get(names)
        if layout is None:
            used = [i for i, name in enumerate(names) if name not in self.exclude]
            used_names = [names[i] for i in used]
            field_keys = np.array([stable_hash(n) << 32 for n in used_names], dtype=np.uint64)
            categorical = np.array([n in self.categorical for n in used_names], dtype=bool)
            pairs: list[tuple[int, int]] = []
            for a_pat, b_pat in self.crosses:
                for ia, a in enumerate(used_names):
                    if not fnmatch.fnmatchcase(a, a_pat):
                        continue
                    for ib, b in enumerate(used_names):
                        if ia != ib and fnmatch.fnmatchcase(b, b_pat) and (ia, ib) not in pairs and (ib, ia) not in pairs:
                            pairs.append((ia, ib))
            layout = self._layouts[names] = _Layout(used, field_keys, categorical, pairs)
        return layout

    @staticmethod
    def _no_groups() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        zero = np.zeros(1, dtype=np.int64)  # group 0 is the empty dummy
        return zero, zero, np.zeros(0, dtype=np.uint64)

    def _group_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(starts, lens, flat crc32s)`` of the multi-valued groups, extended with the groups
        met since the last call (rebuilding it all made a batch of new groups cost O(groups))."""
        starts, lens, flat = self._group_arrays
        if len(lens) < len(self._groups):
            new = self._groups[len(lens):]
            new_lens = np.fromiter(map(len, new), dtype=np.int64, count=len(new))
            new_flat = np.fromiter(chain.from_iterable(new), dtype=np.int64, count=int(new_lens.sum()))
            starts = np.concatenate([starts, len(flat) + np.cumsum(new_lens) - new_lens])
            lens = np.concatenate([lens, new_lens])
            flat = np.concatenate([flat, new_flat.astype(np.uint64)])
            self._group_arrays = (starts, lens, flat)
        return self._group_arrays

    # -- codes to keys --------------------------------------------------------------------------

    def _ragged(
        self, field_key: np.uint64, categorical: bool, codes: np.ndarray, rows: np.ndarray, numbers: np.ndarray
    ) -> _Part:
        """One field's tokens from its codes at ``rows`` (non-decreasing), multi-valued or not."""
        multi = (codes & _MULTI) != 0
        keys, vals = _scalar_keys(field_key, np.bool_(categorical), np.where(multi, 0, codes), numbers)
        if not multi.any():
            return _Part(rows, keys, vals)
        starts, lens, flat = self._group_table()
        gid = codes[multi] & _LOW32
        rep = np.ones(len(codes), dtype=np.int64)
        rep[multi] = lens[gid]
        k = rep[multi]
        first = np.cumsum(k) - k
        out_multi = np.repeat(multi, rep)
        keys = np.repeat(keys, rep)
        keys[out_multi] = field_key | flat[np.repeat(starts[gid] - first, k) + np.arange(int(k.sum()))]
        return _Part(np.repeat(rows, rep), keys, None if vals is None else np.repeat(vals, rep))

    # -- the batch path -------------------------------------------------------------------------

    def transform(self, xs: Sequence[X]) -> HashedBatch:
        """Hash a batch of examples into a :class:`HashedBatch` (``xs`` is not modified)."""
        self._bound_cache()
        n_rows = len(xs)
        try:
            parts = self._parts_same_fields(xs)
        except (KeyError, TypeError, ValueError):  # varying fields, a list value, a bad value
            parts = self._parts_any(xs)
        return self._batch(parts, n_rows)

    def transform_columns(self, cols: EventColumns) -> HashedBatch:
        """Hash the rows of a column batch exactly as ``transform(columns_to_xs(cols))``
        would (same entries, same order), without a dict per row when every row has an
        item, a position and the batch's feature names in one order."""
        self._bound_cache()
        try:
            parts = self._parts_columns(cols)
        except (KeyError, TypeError, ValueError):  # a value the column path cannot take
            parts = None
        if parts is None:
            return self.transform(columns_to_xs(cols))
        return self._batch(parts, len(cols))

    def _bound_cache(self) -> None:
        if len(self._cache) >= self.max_cache:
            self._cache.clear()
            self._groups = [()]
            self._group_arrays = self._no_groups()
            self._block_tables.clear()  # their codes name groups that are gone

    def _batch(self, parts: list[_Part], n_rows: int) -> HashedBatch:
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return HashedBatch(rows=empty, cols=empty, vals=np.zeros(0), n_rows=n_rows)
        rows = np.concatenate([p.rows for p in parts])
        keys = np.concatenate([p.keys for p in parts])
        if all(p.vals is None for p in parts):
            vals = np.ones(len(keys))
        else:
            vals = np.concatenate([np.ones(len(p.keys)) if p.vals is None else p.vals for p in parts])
        cols = ((keys * _GOLD) >> self._shift).view(np.int64)  # Fibonacci hashing: < 2**bits
        return HashedBatch(rows=rows, cols=cols, vals=vals, n_rows=n_rows)

    def _lookup(self, values: Iterable[Any], count: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes of ``values`` (C-level look-ups), and the numbers in a same-shaped array."""
        self._numbers = []
        codes = np.fromiter(map(self._cache.__getitem__, values), np.int64, count)
        numbers = np.zeros(count)
        if self._numbers:
            numbers[(codes & _NUMBER) != 0] = self._numbers
        return codes, numbers

    def _parts_same_fields(self, xs: Sequence[X]) -> list[_Part]:
        """Parts when every example has the first one's fields (raises ``KeyError`` or
        ``TypeError`` otherwise): one look-up pass over the (B, fields) matrix."""
        n_rows = len(xs)
        if not n_rows:
            return []
        names = tuple(xs[0])
        if set(map(len, xs)) != {len(names)}:
            raise KeyError("examples have different fields")
        layout = self._layout(names)
        used = [names[i] for i in layout.used]
        if len(used) < len(names):  # excluded fields: check they are there, skip their values
            if not all(n in x for x in xs for n in names if n in self.exclude):
                raise KeyError("examples have different fields")
        n_f = len(used)
        if not n_f:
            return []
        values = chain.from_iterable(map(itemgetter(*used), xs)) if n_f > 1 else map(itemgetter(used[0]), xs)
        codes, numbers = self._lookup(values, n_rows * n_f)
        return self._parts_from_codes(layout, codes.reshape(n_rows, n_f), numbers.reshape(n_rows, n_f))

    def _parts_columns(self, cols: EventColumns) -> list[_Part] | None:
        """Parts of a column batch; ``None`` when its rows differ in their fields (then the
        dict path decides). Each side's feature codes come from :meth:`_block_codes` (one
        look-up per distinct interned mapping), the ids' from one look-up pass each, the
        positions' straight from the column."""
        n_rows = len(cols)
        if not n_rows:
            return []
        position = cols.position
        if position.dtype != np.int64 or None in cols.item_id:
            return None
        if bool((position < 0).any()) or bool((position >= (1 << 31)).any()):  # NO_VALUE, or beyond the int code
            return None
        user = self._block_codes("user", cols.user_block, cols.user_features)
        item = self._block_codes("item", cols.item_block, cols.item_features)
        if user is None or item is None:
            return None
        (u, u_codes, u_numbers), (i, i_codes, i_numbers) = user, item
        names = ("user_id", *prefixed_names(u, False), "item_id", *prefixed_names(i, True), CTX_PREFIX + "position")
        layout = self._layout(names)
        uid_codes, uid_numbers = self._lookup(cols.user_id, n_rows)
        iid_codes, iid_numbers = self._lookup(cols.item_id, n_rows)
        pos_codes = (position | _INT)[:, None]
        codes = np.hstack([uid_codes[:, None], u_codes, iid_codes[:, None], i_codes, pos_codes])
        numbers = np.hstack([uid_numbers[:, None], u_numbers, iid_numbers[:, None], i_numbers,
                             np.zeros((n_rows, 1))])
        if len(layout.used) < len(names):
            codes, numbers = codes[:, layout.used], numbers[:, layout.used]
        if not codes.shape[1]:
            return []
        return self._parts_from_codes(layout, codes, numbers)

    def _block_codes(self, side: str, blocks: np.ndarray, mappings: list[dict[str, Any]]
                     ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray] | None:
        """``(names, codes (B, n), numbers (B, n))`` of one side's feature mappings, when
        every row has the same names: each interned block's codes are computed once and kept
        in a direct-mapped table per (side, names), so a batch of known mappings costs a few
        array operations, not a look-up per value. Rows whose mapping is not interned
        (:data:`~streams.columns.NO_BLOCK`) are looked up value by value."""
        names = tuple(mappings[0])
        width = len(names)
        table = self._block_tables.get((side, names))
        if table is None:
            table = self._block_tables[(side, names)] = _BlockTable(width, self.block_slots)
        slot = blocks & table.mask
        known = table.owner[slot] == blocks  # NO_BLOCK never owns a slot: it falls to the value path
        if not known.all():
            new, first = np.unique(blocks[~known], return_index=True)
            new_slots = new & table.mask
            if new[0] < 0 or len(np.unique(new_slots)) < len(new_slots):  # not interned, or two in one slot
                return self._value_codes(mappings, names)
            rows = np.flatnonzero(~known)[first].tolist()
            fresh = [mappings[j] for j in rows]
            if any(tuple(m) != names for m in fresh):
                return None  # rows with other names: the dict path decides
            codes, numbers = self._lookup(chain.from_iterable(map(dict.values, fresh)), len(fresh) * width)
            table.codes[new_slots] = codes.reshape(len(fresh), width)
            table.numbers[new_slots] = numbers.reshape(len(fresh), width)
            table.owner[new_slots] = new
        return names, table.codes[slot], table.numbers[slot]

    def _value_codes(self, mappings: list[dict[str, Any]], names: tuple[str, ...]
                     ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray] | None:
        """:meth:`_block_codes` without the table: a look-up per value."""
        if any(tuple(m) != names for m in mappings):
            return None
        n_rows, width = len(mappings), len(names)
        codes, numbers = self._lookup(chain.from_iterable(map(dict.values, mappings)), n_rows * width)
        return names, codes.reshape(n_rows, width), numbers.reshape(n_rows, width)

    def _parts_from_codes(self, layout: _Layout, codes: np.ndarray, numbers: np.ndarray) -> list[_Part]:
        """Parts of the (B, used fields) code matrix of a batch whose rows share their fields."""
        n_rows = codes.shape[0]
        is_multi = ((codes & _MULTI) != 0).any(axis=0)
        dense = np.flatnonzero(~is_multi)
        all_rows = np.arange(n_rows, dtype=np.int64)
        keys, vals = _scalar_keys(
            layout.field_keys[dense], layout.categorical[dense], codes[:, dense], numbers[:, dense]
        )
        ragged = {}
        for j in np.flatnonzero(is_multi).tolist():
            ragged[j] = self._ragged(layout.field_keys[j], bool(layout.categorical[j]), codes[:, j], all_rows, numbers[:, j])
        out = []
        # dense fields and dense x dense crosses: (B, k) blocks
        pos = {int(j): c for c, j in enumerate(dense.tolist())}
        dd = [(pos[a], pos[b]) for a, b in layout.pairs if a in pos and b in pos]
        if dd:
            ia = np.array([a for a, _ in dd])
            ib = np.array([b for _, b in dd])
            cross_keys = keys[:, ia] * _CROSS + keys[:, ib] + _CROSS
            cross_vals = None if vals is None else vals[:, ia] * vals[:, ib]
            keys = np.hstack([keys, cross_keys])
            if vals is not None:
                vals = np.hstack([vals, cross_vals])
        if keys.shape[1]:
            out.append(_Part(np.repeat(all_rows, keys.shape[1]), keys.ravel(), None if vals is None else vals.ravel()))
        # pairs with a multi-valued field
        for a, b in layout.pairs:
            if a in pos and b in pos:
                continue
            pa = ragged.get(a) or _Part(all_rows, keys[:, pos[a]], None if vals is None else vals[:, pos[a]])
            pb = ragged.get(b) or _Part(all_rows, keys[:, pos[b]], None if vals is None else vals[:, pos[b]])
            out.append(_cross(pa, pb, n_rows, dense_a=a in pos, dense_b=b in pos))
        out.extend(ragged.values())
        return out

    def _parts_any(self, xs: Sequence[X]) -> list[_Part]:
        """Parts for any examples: a Python loop over the features (the slow path)."""
        by_field: dict[str, tuple[list[int], list[Any]]] = {}
        for row, x in enumerate(xs):
            for name, value in x.items():
                if name in self.exclude:
                    continue
                rows, values = by_field.setdefault(name, ([], []))
                rows.append(row)
                values.append(value)
        names = tuple(by_field)
        layout = self._layout(names)
        parts = []
        for j, name in enumerate(names):
            rows, values = by_field[name]
            self._numbers = []
            codes = np.array([self._code(name, v) for v in values], dtype=np.int64)
            numbers = np.zeros(len(codes))
            if self._numbers:
                numbers[(codes & _NUMBER) != 0] = self._numbers
            parts.append(self._ragged(layout.field_keys[j], bool(layout.categorical[j]), codes,
                                      np.array(rows, dtype=np.int64), numbers))
        crosses = [_cross(parts[a], parts[b], len(xs), dense_a=False, dense_b=False) for a, b in layout.pairs]
        return parts + crosses

    def __repr__(self) -> str:
        return (
            f"FeatureHasher(bits={self.bits}, crosses={self.crosses!r}, "
            f"categorical={tuple(sorted(self.categorical))!r}, exclude={tuple(sorted(self.exclude))!r}, "
            f"max_cache={self.max_cache})"
        )
