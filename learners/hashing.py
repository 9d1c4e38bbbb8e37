"""Feature hashing: map examples ``x`` to sparse rows of ``2**bits`` buckets, fast and stably.

Every feature becomes one or more *tokens*:

* a string ``v`` of feature ``name`` -> token ``"name=v"``, value 1;
* a tuple of strings (multi-valued) -> one token per element, value 1 each;
* an int of a feature listed in ``categorical`` (by default ``ctx:position``) -> ``"name=v"``;
* any other number -> token ``"name"`` with the number as its value;
* a *cross* of two fields (patterns in ``crosses``, e.g. ``("user_id", "i:*")``) -> one
  token per pair of their tokens within the example, value the product of their values.

A token's hash is ``zlib.crc32`` of its UTF-8 text (never Python's salted ``hash()``),
finalised by a 64-bit mixer; a cross hashes the pair of its token hashes. Bucket indices
therefore depend on nothing but the text: they are identical in every process, which is
what lets a checkpoint be restored elsewhere. Token hashes are cached per field and
value, so after warm-up encoding costs a few dictionary look-ups per feature; crosses and
the final mixing are vectorized over the batch.

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
from typing import Any, Iterable, Sequence

import numpy as np

from learners.base import X

__all__ = ["FeatureHasher", "HashedBatch", "DEFAULT_CROSSES", "stable_hash", "feature_tokens"]

#: Crosses used when none are given: each user id with every item feature, and every
#: user feature with every item feature.
DEFAULT_CROSSES: tuple[tuple[str, str], ...] = (("user_id", "i:*"), ("u:*", "i:*"))
_EXCLUDE_DEFAULT: tuple[str, ...] = ("ctx:event_time",)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_LOW32 = (1 << 32) - 1


def stable_hash(token: str) -> int:
    """The 32-bit hash of a token: ``zlib.crc32`` of its UTF-8 bytes (same in every process).

    >>> stable_hash("user_id=u1") == stable_hash("user_id=" + "u1")
    True
    """
    return zlib.crc32(token.encode("utf-8"))


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic): spreads the bits of ``h``."""
    h = h ^ (h >> _S30)
    h = h * _M1
    h = h ^ (h >> _S27)
    h = h * _M2
    return h ^ (h >> _S31)


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


# A code is one int64 per (name, value): ``field_id << 32 | crc32(token)`` for one token;
# with _MULTI set, the low bits index a group of such codes (a multi-valued feature); with
# _NUMBER set, the value comes from a side list (plain numbers are never cached).
_NUMBER = 1 << 62
_MULTI = 1 << 61
_FLAGS = _NUMBER | _MULTI


class _CodeCache(dict):
    """One field's ``value -> code``; a miss asks the hasher (``__missing__`` is called from C)."""

    __slots__ = ("name", "miss")

    def __missing__(self, value: Any) -> int:
        return self.miss(self.name, value)


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
        Cache size in ``(name, value)`` pairs; the cache is cleared when it grows past it.
        It holds no state (codes are recomputed identically), it only saves time.
    """

    def __init__(
        self,
        bits: int = 20,
        crosses: Sequence[Sequence[str]] | None = None,
        categorical: Sequence[str] = ("ctx:position",),
        exclude: Sequence[str] = _EXCLUDE_DEFAULT,
        max_cache: int = 1_000_000,
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
        self._mask = np.uint64((1 << self.bits) - 1)
        self._caches: dict[str, _CodeCache] = {}
        self._numbers: list[float] = []  # values of the plain numbers met by this transform
        self._groups: list[tuple[int, ...]] = [()]  # codes of each multi-valued (name, value)
        self._group_arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._fid: dict[str, int] = {}
        self._field_names: list[str] = []
        self._cross_pairs: list[tuple[int, int]] = []  # (a, b) field ids, a first
        self._left = np.zeros(0, dtype=bool)
        self._right = np.zeros(0, dtype=bool)
        self._is_cross = np.zeros((0, 0), dtype=bool)

    @property
    def n_buckets(self) -> int:
        return 1 << self.bits

    # -- the per-(name, value) slow path ---------------------------------------------------

    def _cache_of(self, name: str) -> _CodeCache:
        cache = self._caches.get(name)
        if cache is None:
            self._add_field(name)
            cache = self._caches[name] = _CodeCache()
            cache.name = name
            cache.miss = self._miss
        return cache

    def _add_field(self, name: str) -> int:
        fid = len(self._field_names)
        self._field_names.append(name)
        self._fid[name] = fid
        for a_pat, b_pat in self.crosses:
            for other_id, other in enumerate(self._field_names):
                if other_id == fid:  # a field is never crossed with itself
                    continue
                if fnmatch.fnmatchcase(name, a_pat) and fnmatch.fnmatchcase(other, b_pat):
                    pair = (fid, other_id)
                elif fnmatch.fnmatchcase(other, a_pat) and fnmatch.fnmatchcase(name, b_pat):
                    pair = (other_id, fid)
                else:
                    continue
                if pair not in self._cross_pairs and (pair[1], pair[0]) not in self._cross_pairs:
                    self._cross_pairs.append(pair)
        n = len(self._field_names)
        self._left = np.zeros(n, dtype=bool)
        self._right = np.zeros(n, dtype=bool)
        self._is_cross = np.zeros((n, n), dtype=bool)
        for a, b in self._cross_pairs:
            self._left[a] = self._right[b] = self._is_cross[a, b] = True
        return fid

    def _miss(self, name: str, value: Any) -> int:
        """The code of one ``(name, value)``, cached unless it is a plain number."""
        fid = self._fid[name]
        if name in self.exclude:
            # an empty group: no tokens. Not cached: an excluded field's values vary freely.
            return _MULTI | 0  # group 0 is the empty group
        toks = feature_tokens(name, value, self.categorical)
        if len(toks) == 1 and toks[0][0] == name:  # a plain number
            self._numbers.append(toks[0][1])
            return _NUMBER | (fid << 32) | stable_hash(name)
        if isinstance(value, (tuple, list)):
            code = _MULTI | len(self._groups)
            self._groups.append(tuple((fid << 32) | stable_hash(t) for t, _ in toks))
            self._group_arrays = None
        else:
            code = (fid << 32) | stable_hash(toks[0][0])
        self._caches[name][value] = code
        return code

    # -- the batch path ---------------------------------------------------------------------

    def transform(self, xs: Sequence[X]) -> HashedBatch:
        """Hash a batch of examples into a :class:`HashedBatch` (``xs`` is not modified).

        The per-feature work runs in C (``map`` over a dict whose misses call back into
        Python); numbers, multi-valued features, crosses and mixing are vectorized.
        """
        if sum(map(len, self._caches.values())) >= self.max_cache:
            for cache in self._caches.values():
                cache.clear()
            self._groups = [()]
            self._group_arrays = None
        self._numbers = []
        n_rows = len(xs)
        try:
            codes, n_features = self._codes_same_fields(xs)
        except (KeyError, TypeError):  # varying fields, a non-dict Mapping, a list value
            codes, n_features = self._codes_any(xs)
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), n_features)
        vals = np.ones(len(codes), dtype=np.float64)
        if self._numbers:
            numeric = (codes & _NUMBER) != 0
            vals[numeric] = self._numbers
            self._numbers = []
        codes, rows, vals = self._expand_groups(codes, rows, vals)
        codes &= ~_FLAGS
        fields = codes >> 32
        h = (codes & _LOW32).astype(np.uint64)
        if self._cross_pairs and len(codes):
            c_rows, c_h, c_vals = self._crosses(rows, fields, h, vals, n_rows)
            if len(c_rows):
                rows = np.concatenate([rows, c_rows])
                h = np.concatenate([h, c_h])
                vals = np.concatenate([vals, c_vals])
        cols = (_mix64(h) & self._mask).astype(np.int64)
        return HashedBatch(rows=rows, cols=cols, vals=vals, n_rows=n_rows)

    def _codes_same_fields(self, xs: Sequence[X]) -> tuple[np.ndarray, np.ndarray]:
        """Codes in row order when every example has the first one's fields: one C-level
        ``map`` per field. Raises ``KeyError``/``TypeError`` when that does not hold."""
        n_rows = len(xs)
        names = list(xs[0]) if n_rows else []
        n_features = np.fromiter(map(len, xs), dtype=np.int64, count=n_rows)
        if n_rows and (n_features != len(names)).any():
            raise KeyError("examples have different fields")
        by_field = np.empty((len(names), n_rows), dtype=np.int64)
        for j, name in enumerate(names):
            cache = self._cache_of(name)
            by_field[j] = np.fromiter(map(cache.__getitem__, map(itemgetter(name), xs)), np.int64, n_rows)
        if self._numbers:  # their values were met field by field: put them in row order
            numeric = (by_field & _NUMBER) != 0
            order = np.zeros(by_field.shape, dtype=np.int64)
            order[numeric] = np.arange(int(numeric.sum()))
            self._numbers = list(np.asarray(self._numbers)[order.T[numeric.T]])
        return by_field.T.ravel(), n_features

    def _codes_any(self, xs: Sequence[X]) -> tuple[np.ndarray, np.ndarray]:
        """Codes in row order for any examples (a Python loop: the slow path)."""
        self._numbers = []
        codes = []
        for x in xs:
            for name, value in x.items():
                if isinstance(value, list):
                    value = tuple(value)
                cache = self._cache_of(name)
                try:
                    codes.append(cache[value])
                except TypeError:  # unhashable: feature_tokens says what is wrong with it
                    codes.append(self._miss(name, value))
        n_features = np.array([len(x) for x in xs], dtype=np.int64)
        return np.array(codes, dtype=np.int64), n_features

    def _group_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._group_arrays is None:
            lens = np.fromiter(map(len, self._groups), dtype=np.int64, count=len(self._groups))
            flat = np.fromiter(chain.from_iterable(self._groups), dtype=np.int64, count=int(lens.sum()))
            self._group_arrays = (np.cumsum(lens) - lens, lens, flat)
        return self._group_arrays

    def _expand_groups(
        self, codes: np.ndarray, rows: np.ndarray, vals: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Replace each multi-valued code by its group's codes (value 1 each)."""
        multi = (codes & _FLAGS) == _MULTI
        if not multi.any():
            return codes, rows, vals
        starts, lens, flat = self._group_table()
        gid = codes[multi] & _LOW32
        rep = np.ones(len(codes), dtype=np.int64)
        rep[multi] = lens[gid]
        new_rows = np.repeat(rows, rep)
        new_vals = np.repeat(vals, rep)
        new_codes = np.repeat(codes, rep)
        out_multi = np.repeat(multi, rep)
        k = rep[multi]
        first = np.cumsum(k) - k
        total = int(k.sum())
        new_codes[out_multi] = flat[np.repeat(starts[gid] - first, k) + np.arange(total, dtype=np.int64)]
        return new_codes, new_rows, new_vals

    def _crosses(
        self, rows: np.ndarray, fields: np.ndarray, h: np.ndarray, vals: np.ndarray, n_rows: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All crossed token pairs within each row: a vectorized join of left and right tokens.

        Returns the rows, pre-mix hashes (uint64) and values of the cross tokens.
        """
        empty = (np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.float64))
        left = np.flatnonzero(self._left[fields])
        right = np.flatnonzero(self._right[fields])
        if not len(left) or not len(right):
            return empty
        # rows are non-decreasing, so each row's right tokens are contiguous in `right`
        r_count = np.bincount(rows[right], minlength=n_rows)
        r_start = np.cumsum(r_count) - r_count
        l_rows = rows[left]
        rep = r_count[l_rows]
        total = int(rep.sum())
        if not total:
            return empty
        a = np.repeat(left, rep)
        first = np.cumsum(rep) - rep
        b = right[np.repeat(r_start[l_rows] - first, rep) + np.arange(total, dtype=np.int64)]
        keep = self._is_cross[fields[a], fields[b]]
        a, b = a[keep], b[keep]
        # an asymmetric pair hash: (a, b) and (b, a) land in different buckets
        return rows[a], _mix64(h[a] * _GOLD + h[b]) ^ _GOLD, vals[a] * vals[b]

    def __repr__(self) -> str:
        return (
            f"FeatureHasher(bits={self.bits}, crosses={self.crosses!r}, "
            f"categorical={tuple(sorted(self.categorical))!r}, exclude={tuple(sorted(self.exclude))!r}, "
            f"max_cache={self.max_cache})"
        )
