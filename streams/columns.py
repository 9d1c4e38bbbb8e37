"""A whole poll decoded into typed columns: one msgspec pass, validation included.

:func:`decode_columns` turns a batch of record values (JSON, the wire format
:func:`~streams.events.encode_event` writes, schema version 1) into one
:class:`EventColumns`: numpy arrays for the numbers (event times, labels, positions,
``k``, the kind), lists for the ids and the feature mappings, and ``source``, the index of
the record each row came from. No :class:`~streams.events.Event` and no per-event dict is
built for a valid record.

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
from operator import attrgetter
from typing import Annotated, Any, ClassVar, Literal, Optional, Sequence, Union

import msgspec
import numpy as np

from streams.events import EVENT_KINDS, SCHEMA_VERSION, Event, _fast_event, decode_events

__all__ = ["EventColumns", "decode_columns", "KIND_CODES", "NO_VALUE"]

#: kind -> its code in :attr:`EventColumns.kind`.
KIND_CODES: dict[str, int] = {kind: i for i, kind in enumerate(EVENT_KINDS)}
#: What an integer column holds where the event has no value (a request's label).
NO_VALUE = -1

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# orjson (the validator's parser) keeps integers within uint64 as int and turns larger
# ones into floats: beyond int64 msgspec refuses (its bounds stop there), and the validator decides.
_Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Features = dict[str, Union[str, _Int, float, tuple[str, ...]]]
_Time = Annotated[float, msgspec.Meta(ge=0)]  # msgspec refuses infinities ("out of range")
_Position = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Impression(msgspec.Struct, tag_field="kind", tag="impression", forbid_unknown_fields=True):
    schema_version: Literal[1]
    event_id: _Id
    event_time: _Time
    user_id: _Id
    request_id: _Id
    item_id: _Id
    label: Literal[0, 1]
    position: _Position
    user_features: _Features = {}
    item_features: _Features = {}
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
    user_features: _Features = {}
    item_features: _Features = {}
    k: None = None
    kind: ClassVar[str] = "click"


class _Request(msgspec.Struct, tag_field="kind", tag="request", forbid_unknown_fields=True):
    schema_version: Literal[1]
    event_id: _Id
    event_time: _Time
    user_id: _Id
    request_id: _Id
    k: Optional[Annotated[int, msgspec.Meta(ge=1, le=10_000)]] = None
    user_features: _Features = {}
    item_id: None = None
    label: None = None
    position: None = None
    item_features: Any = None  # a request's item features are ignored, whatever they are
    kind: ClassVar[str] = "request"


_DECODER = msgspec.json.Decoder(Union[_Impression, _Click, _Request])
_ROW = attrgetter("kind", "event_id", "event_time", "user_id", "request_id", "item_id", "label", "position",
                  "k", "user_features", "item_features")
_REQUEST_CODE = KIND_CODES["request"]


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
        a request's item features are ``{}``). Shared, not copied: do not modify.
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
        """Row ``i`` as an :class:`Event`, equal to what :func:`~streams.events.decode_event` gives."""
        kind = EVENT_KINDS[int(self.kind[i])]
        label, position, k = (int(v) for v in (self.label[i], self.position[i], self.k[i]))
        return _fast_event(
            kind=kind, event_id=self.event_id[i], event_time=float(self.event_time[i]), user_id=self.user_id[i],
            request_id=self.request_id[i], user_features=self.user_features[i], item_id=self.item_id[i],
            item_features=self.item_features[i], label=None if label == NO_VALUE else label,
            position=None if position == NO_VALUE else position, k=None if k == NO_VALUE else k,
            schema_version=SCHEMA_VERSION,
        )

    def events(self) -> list[Event]:
        """Every row as an :class:`Event` (for per-event consumers such as River)."""
        return [self.event(i) for i in range(len(self))]

    @classmethod
    def from_events(cls, events: Sequence[Event], source: Sequence[int] | None = None) -> EventColumns:
        """Columns of already validated events (``source`` defaults to 0..N-1)."""
        return _columns([_ROW(e) for e in events], list(range(len(events))) if source is None else list(source))


_FIELDS = tuple(EventColumns.__dataclass_fields__)


def _ints(values: list[Any]) -> np.ndarray:
    values = [NO_VALUE if v is None else v for v in values]
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:  # the schema bounds no position: one of 2**63 or more is valid
        return np.array(values, dtype=object)


def _columns(rows: list[tuple], source: list[int]) -> EventColumns:
    """Columns of ``_ROW`` tuples."""
    n = len(rows)
    if n:
        kind, eid, t, uid, rid, iid, label, position, k, uf, itf = (list(c) for c in zip(*rows))
    else:
        kind, eid, t, uid, rid, iid, label, position, k, uf, itf = ([] for _ in range(11))
    codes = np.array([KIND_CODES[c] for c in kind], dtype=np.uint8)
    requests = np.flatnonzero(codes == _REQUEST_CODE).tolist()
    for i in requests:
        itf[i] = {}
    return EventColumns(
        kind=codes, event_time=np.array(t, dtype=np.float64), label=_ints(label), position=_ints(position),
        k=_ints(k), event_id=eid, user_id=uid, request_id=rid, item_id=iid, user_features=uf,
        item_features=itf, source=np.array(source, dtype=np.int64),
    )


def decode_columns(raws: Sequence[bytes | str | None]) -> tuple[EventColumns, list[tuple[int, Exception]]]:
    """Decode and validate a batch of record values into :class:`EventColumns`.

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
    rows: list[Any] = []
    source: list[int] = []
    refused: list[int] = []
    decode = _DECODER.decode
    for i, raw in enumerate(raws):
        try:
            rows.append(decode(raw))
        except (msgspec.DecodeError, TypeError):  # ValidationError is a DecodeError
            refused.append(i)
            rows.append(None)
        else:
            source.append(i)
    rejects: list[tuple[int, Exception]] = []
    if refused:
        for i, result in zip(refused, decode_events([raws[i] for i in refused])):
            if isinstance(result, Event):
                rows[i] = result
            else:
                rejects.append((i, result))
        source = [i for i, r in enumerate(rows) if r is not None and not isinstance(r, Exception)]
        rows = [rows[i] for i in source]
    return _columns(list(map(_ROW, rows)), source), rejects
