"""A whole poll decoded into typed columns: one msgspec pass, validation included.

:func:`decode_columns` turns a batch of record values (JSON, the wire format
:func:`~streams.events.encode_event` writes, schema version 1) into one
:class:`EventColumns`: numpy arrays for the numbers (event times, labels, positions,
``k``, the kind), lists for the ids and the feature mappings, and ``source``, the index of
the record each row came from. No :class:`~streams.events.Event` and no per-event dict is
built for a valid record: feature objects are interned (:class:`FeatureBlocks`): each
distinct ``user_features`` / ``item_features`` JSON object is validated and built into a
dict once, and every row carrying those bytes shares that dict and its block id
(``user_block`` / ``item_block``), which is what lets a learner hash or encode a user's
or an item's features once per distinct mapping instead of once per event.

Validation happens while decoding: each kind is a typed ``msgspec.Struct`` (tagged by
``kind``, unknown fields forbidden, ids 1..256 characters, ``label``/``position``/``k``
ranges, integers only where the schema wants them). msgspec is stricter than the schema
in a few corners (a ``true`` feature, a ``null`` optional field, a request's ignored
``item_features``); a record msgspec refuses is handed to the full validator
(:func:`~streams.events.decode_events`), which either accepts it (its row is added from
the :class:`Event`) or rejects it with the reason and message it always gave. So the
dead-letter reasons are exactly the validator's, and the columns hold exactly the events
the validator would build.

>>> from streams.events import Event, encode_event
>>> ok = encode_event(Event(kind="impression", event_id="e", event_time=1.0, user_id="u",
...                         request_id="r", item_id="i", item_features={"g": ("a", "b")},
...                         label=1, position=0))
>>> cols, rejects = decode_columns([ok, b'{"kind": 1}', ok])
>>> len(cols), cols.source.tolist(), cols.label.tolist(), cols.item_features[0]
(2, [0, 2], [1, 1], {'g': ('a', 'b')})
>>> [(i, e.reason) for i, e in rejects]
[(1, 'missing_field')]
"""

from __future__ import annotations

from dataclasses import dataclass
import itertools
from operator import attrgetter, itemgetter
from typing import Annotated, Any, ClassVar, Literal, Optional, Sequence, Union

import msgspec
import numpy as np

from streams.events import EVENT_KINDS, SCHEMA_VERSION, Event, _fast_event, decode_events

__all__ = ["EventColumns", "FeatureBlocks", "BLOCKS", "decode_columns", "KIND_CODES", "NO_VALUE", "EMPTY_BLOCK",
           "NO_BLOCK"]

#: kind -> its code in :attr:`EventColumns.kind`.
KIND_CODES: dict[str, int] = {kind: i for i, kind in enumerate(EVENT_KINDS)}
#: What an integer column holds where the event has no value (a request's label).
NO_VALUE = -1
#: The block id of the empty feature mapping, and of a mapping that is not interned.
EMPTY_BLOCK = 0
NO_BLOCK = -1

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# orjson (the validator's parser) keeps integers within uint64 as int and turns larger
# ones into floats: beyond int64 msgspec refuses (its bounds stop there), and the validator decides.
_Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Features = dict[str, Union[str, _Int, float, tuple[str, ...]]]
_Time = Annotated[float, msgspec.Meta(ge=0)]  # msgspec refuses infinities ("out of range")
_Position = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# feature objects stay raw JSON while a record decodes; FeatureBlocks validates each
# distinct one once (with this decoder) and hands out the one dict of those bytes
_EMPTY_RAW = msgspec.Raw(b"{}")
_FEATURES_DECODER = msgspec.json.Decoder(_Features)


class _Impression(msgspec.Struct, tag_field="kind", tag="impression", forbid_unknown_fields=True):
    schema_version: Literal[1]
    event_id: _Id
    event_time: _Time
    user_id: _Id
    request_id: _Id
    item_id: _Id
    label: Literal[0, 1]
    position: _Position
    user_features: msgspec.Raw = _EMPTY_RAW
    item_features: msgspec.Raw = _EMPTY_RAW
    k: None = None
    kind: ClassVar[str] = "impression"


class _Click(msgspec.Struct, tag_field="kind", tag="click", forbid_unknown_fields=True):
    schema_version: Literal[1]
    event_id: _Id
    event_time: _Time
    user_id: _Id
    request_id: _Id
    item_id: _Id
    label: Literal[1] = 1
    position: Optional[_Position] = None
    user_features: msgspec.Raw = _EMPTY_RAW
    item_features: msgspec.Raw = _EMPTY_RAW
    k: None = None
    kind: ClassVar[str] = "click"


class _Request(msgspec.Struct, tag_field="kind", tag="request", forbid_unknown_fields=True):
    schema_version: Literal[1]
    event_id: _Id
    event_time: _Time
    user_id: _Id
    request_id: _Id
    k: Optional[Annotated[int, msgspec.Meta(ge=1, le=10_000)]] = None
    user_features: msgspec.Raw = _EMPTY_RAW
    item_id: None = None
    label: None = None
    position: None = None
    item_features: Any = None  # a request's item features are ignored, whatever they are
    kind: ClassVar[str] = "request"


_DECODER = msgspec.json.Decoder(Union[_Impression, _Click, _Request])
_ROW = attrgetter("kind", "event_id", "event_time", "user_id", "request_id", "item_id", "label", "position",
                  "k", "user_features", "item_features")
_SCALARS = attrgetter("kind", "event_id", "event_time", "user_id", "request_id", "item_id", "label", "position", "k")
_REQUEST_CODE = KIND_CODES["request"]
_BAD = (NO_BLOCK, None)
_EMPTY: dict[str, Any] = {}  # the one mapping of block EMPTY_BLOCK (never modified)


class FeatureBlocks:
    """Interned feature mappings: the raw JSON of a ``user_features`` / ``item_features``
    object -> ``(block id, the validated dict)``.

    A stream repeats its users' and items' feature objects byte for byte, so
    :func:`decode_columns` leaves them raw while a record decodes and validates each
    distinct object once; every row holding those bytes gets the same dict and the same
    block id. Consumers cache per block id whatever they derive from a mapping (the
    feature hasher its value codes), so a batch touches each distinct mapping once, not
    each row's values. Ids are never reused: a block id denotes one mapping for the life
    of the process, also across a :meth:`clear` (the table is cleared when it holds
    ``max_blocks`` mappings, so memory stays bounded however the features vary), and
    unique across every ``FeatureBlocks`` of the process. Id :data:`EMPTY_BLOCK` is the
    empty mapping.

    >>> blocks = FeatureBlocks()
    >>> ids, dicts, bad = blocks.intern([b'{"age": "25-34"}', b'{}', b'{"age": "25-34"}', b'{"age": true}'])
    >>> ids[0] == ids[2] != EMPTY_BLOCK == ids[1], dicts[0] is dicts[2], dicts[0], bad
    (True, True, {'age': '25-34'}, [3])
    """

    def __init__(self, max_blocks: int = 1 << 18) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.max_blocks = int(max_blocks)
        self._by_raw: dict[bytes, tuple[int, dict[str, Any]]] = {}
        self.clear()

    def __len__(self) -> int:
        return len(self._by_raw)

    def clear(self) -> None:
        """Forget every mapping but the empty one (ids already handed out stay unique)."""
        self._by_raw.clear()
        self._by_raw[b"{}"] = (EMPTY_BLOCK, _EMPTY)

    def intern(self, raws: Sequence[bytes | msgspec.Raw]) -> tuple[list[int], list[dict[str, Any] | None], list[int]]:
        """``(ids, dicts, bad)`` of the feature objects ``raws``: ``bad`` lists the positions
        whose object is not a valid feature mapping (their id is :data:`NO_BLOCK`, their dict
        ``None``); the validator decides their reason."""
        keys = list(map(bytes, raws))
        by_raw = self._by_raw
        hits = list(map(by_raw.get, keys))
        bad: list[int] = []
        if None in hits:
            for j, hit in enumerate(hits):
                if hit is not None:
                    continue
                key = keys[j]
                hit = by_raw.get(key)  # an earlier row of this batch may have added it
                if hit is None:
                    try:
                        features = _FEATURES_DECODER.decode(key)
                    except msgspec.DecodeError:  # ValidationError is one
                        bad.append(j)
                        hits[j] = _BAD
                        continue
                    if len(by_raw) >= self.max_blocks:
                        self.clear()
                    hit = by_raw[key] = (next(_NEXT_BLOCK), features)
                hits[j] = hit
        return list(map(_first, hits)), list(map(_second, hits)), bad


_first, _second = itemgetter(0), itemgetter(1)
# one sequence for every table in the process: a block id names one mapping whichever
# FeatureBlocks handed it out, so caches keyed by block id never mix two tables' mappings
_NEXT_BLOCK = itertools.count(EMPTY_BLOCK + 1)
#: The blocks :func:`decode_columns` interns into unless given others.
BLOCKS = FeatureBlocks()


@dataclass(frozen=True)
class EventColumns:
    """Valid events as columns, row ``i`` from record ``source[i]`` of the decoded batch.

    Attributes
    ----------
    kind
        (N,) uint8 codes, see :data:`KIND_CODES`.
    event_time
        (N,) float64 seconds since the epoch.
    label, position, k
        (N,) int64, :data:`NO_VALUE` where the event has none (a click keeps its default
        label 1); an object array in the odd batch holding a position beyond int64.
    event_id, user_id, request_id, item_id
        The ids (``item_id`` is ``None`` for a request).
    user_features, item_features
        One feature mapping per row, as the validator builds it (lists become tuples;
        a request's item features are ``{}``). Interned: rows with the same block id share
        one dict (also across batches), so never modify one.
    user_block, item_block
        (N,) int64 :class:`FeatureBlocks` ids of those mappings (equal ids, equal mapping);
        :data:`NO_BLOCK` where a row's mapping is not interned (built by the validator).
    source
        (N,) int64 index of each row's record in the decoded batch.
    """

    kind: np.ndarray
    event_time: np.ndarray
    label: np.ndarray
    position: np.ndarray
    k: np.ndarray
    event_id: list[str]
    user_id: list[str]
    request_id: list[str]
    item_id: list[str | None]
    user_features: list[dict[str, Any]]
    item_features: list[dict[str, Any]]
    user_block: np.ndarray
    item_block: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.event_id)

    def take(self, rows: np.ndarray | slice) -> EventColumns:
        """The rows ``rows`` (indices, a boolean mask or a slice), in that order."""
        if isinstance(rows, slice):
            pick = lambda seq: seq[rows]  # noqa: E731
        else:
            index = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows, dtype=np.int64)
            ids = index.tolist()
            pick = lambda seq: seq[index] if isinstance(seq, np.ndarray) else [seq[i] for i in ids]  # noqa: E731
        return EventColumns(**{name: pick(getattr(self, name)) for name in _FIELDS})

    def of_kind(self, kind: str) -> EventColumns:
        """The rows of one kind (e.g. the impressions a learner learns from)."""
        mask = self.kind == KIND_CODES[kind]
        return self if mask.all() else self.take(mask)

    def event(self, i: int) -> Event:
        """Row ``i`` as an :class:`Event`, equal to what :func:`~streams.events.decode_event`
        gives (with its own copies of the interned feature mappings)."""
        kind = EVENT_KINDS[int(self.kind[i])]
        label, position, k = (int(v) for v in (self.label[i], self.position[i], self.k[i]))
        return _fast_event(
            kind=kind, event_id=self.event_id[i], event_time=float(self.event_time[i]), user_id=self.user_id[i],
            request_id=self.request_id[i], user_features=dict(self.user_features[i]), item_id=self.item_id[i],
            item_features=dict(self.item_features[i]), label=None if label == NO_VALUE else label,
            position=None if position == NO_VALUE else position, k=None if k == NO_VALUE else k,
            schema_version=SCHEMA_VERSION,
        )

    def events(self) -> list[Event]:
        """Every row as an :class:`Event` (for per-event consumers such as River)."""
        return [self.event(i) for i in range(len(self))]

    @classmethod
    def from_events(cls, events: Sequence[Event], source: Sequence[int] | None = None) -> EventColumns:
        """Columns of already validated events (``source`` defaults to 0..N-1; their
        mappings are not interned: block ids :data:`NO_BLOCK`)."""
        rows = [_ROW(e) for e in events]
        no_block = [NO_BLOCK] * len(rows)
        return _columns([r[:9] for r in rows], [r[9] for r in rows], [r[10] for r in rows], no_block, no_block,
                        list(range(len(events))) if source is None else list(source))


_FIELDS = tuple(EventColumns.__dataclass_fields__)


def _ints(values: list[Any]) -> np.ndarray:
    values = [NO_VALUE if v is None else v for v in values]
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:  # the schema bounds no position: one of 2**63 or more is valid
        return np.array(values, dtype=object)


def _columns(rows: list[tuple], uf: list[dict[str, Any]], itf: list[dict[str, Any]], ub: Sequence[int],
             ib: Sequence[int], source: list[int]) -> EventColumns:
    """Columns of ``_SCALARS`` tuples and the rows' feature mappings and block ids."""
    n = len(rows)
    if n:
        kind, eid, t, uid, rid, iid, label, position, k = (list(c) for c in zip(*rows))
    else:
        kind, eid, t, uid, rid, iid, label, position, k = ([] for _ in range(9))
    codes = np.array([KIND_CODES[c] for c in kind], dtype=np.uint8)
    item_block = np.array(ib, dtype=np.int64)
    requests = np.flatnonzero(codes == _REQUEST_CODE).tolist()
    if requests:
        itf = list(itf)
        for i in requests:
            itf[i] = _EMPTY
        item_block[requests] = EMPTY_BLOCK
    return EventColumns(
        kind=codes, event_time=np.array(t, dtype=np.float64), label=_ints(label), position=_ints(position),
        k=_ints(k), event_id=eid, user_id=uid, request_id=rid, item_id=iid, user_features=uf,
        item_features=itf, user_block=np.array(ub, dtype=np.int64), item_block=item_block,
        source=np.array(source, dtype=np.int64),
    )


def decode_columns(raws: Sequence[bytes | str | None],
                   blocks: FeatureBlocks | None = None) -> tuple[EventColumns, list[tuple[int, Exception]]]:
    """Decode and validate a batch of record values into :class:`EventColumns`.

    ``blocks`` is where the feature mappings are interned (default :data:`BLOCKS`).

    Returns
    -------
    columns
        The valid events, in record order.
    rejects
        ``(index into raws, exception)`` of every record the validator refused: an
        :class:`~streams.errors.EventValidationError` with its ``reason`` (``json`` for a
        tombstone), or a ``ValueError``/``TypeError``/``OverflowError`` (a validator gap),
        exactly what :func:`~streams.events.decode_events` gives for it.
    """
    blocks = BLOCKS if blocks is None else blocks
    structs: list[Any] = []
    where: list[int] = []  # record index of each struct
    refused: list[int] = []
    decode = _DECODER.decode
    for i, raw in enumerate(raws):
        try:
            structs.append(decode(raw))
        except (msgspec.DecodeError, TypeError):  # ValidationError is a DecodeError
            refused.append(i)
        else:
            where.append(i)
    ub, uf, bad_u = blocks.intern([s.user_features for s in structs])
    ib, itf, bad_i = blocks.intern([_EMPTY_RAW if type(s) is _Request else s.item_features for s in structs])
    scalars = list(map(_SCALARS, structs))
    if bad_u or bad_i:  # a feature object msgspec refuses: the validator decides
        bad = set(bad_u) | set(bad_i)
        refused = sorted(refused + [where[j] for j in bad])
        keep = [j for j in range(len(structs)) if j not in bad]
        where, scalars = [where[j] for j in keep], [scalars[j] for j in keep]
        ub, uf, ib, itf = ([seq[j] for j in keep] for seq in (ub, uf, ib, itf))
    rejects: list[tuple[int, Exception]] = []
    if refused:
        accepted: list[tuple[int, Event]] = []
        for i, result in zip(refused, decode_events([raws[i] for i in refused])):
            if isinstance(result, Event):
                accepted.append((i, result))
            else:
                rejects.append((i, result))
        if accepted:  # merge the validator's events back in record order
            merged = sorted(
                [(i, s, u, it, bu, bi) for i, s, u, it, bu, bi in zip(where, scalars, uf, itf, ub, ib)]
                + [(i, _ROW(e)[:9], e.user_features, e.item_features, NO_BLOCK, NO_BLOCK) for i, e in accepted],
                key=_first)
            where, scalars, uf, itf, ub, ib = (list(c) for c in zip(*merged))
    return _columns(scalars, uf, itf, ub, ib, where), rejects
