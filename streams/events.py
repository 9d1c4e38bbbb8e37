"""The click-event contract: a versioned schema, strict validation, JSON encoding.

Three kinds of event travel on Kafka:

``impression``
    An item was shown to a user at a position in answer to a request. ``label`` is the
    click outcome joined to it (1 clicked, 0 not): learners learn from impressions.
``click``
    A raw click on an item shown for ``request_id`` (``label`` is always 1). The scorer
    joins clicks to what it served to compute online AUC.
``request``
    A user asking for ``k`` candidates: no item, no label.

Every record carries ``schema_version``; a consumer rejects a version it does not
know (the record goes to the dead-letter topic with the reason, see
:mod:`streams.deadletter`).

>>> e = Event(kind="impression", event_id="e1", event_time=1.5e9, user_id="u1",
...           request_id="r1", user_features={"age": "25-34"}, item_id="i9",
...           item_features={"category": "c3", "genres": ["Drama"]}, label=1, position=0)
>>> decode_event(encode_event(e)) == e
True
>>> decode_event(b'{"kind": "impression"}')
Traceback (most recent call last):
...
streams.errors.EventValidationError: missing field 'schema_version' (every event must carry "schema_version": 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Iterable, Literal, Mapping, Union

import orjson

from streams.errors import EventValidationError

__all__ = [
    "SCHEMA_VERSION",
    "EVENT_KINDS",
    "Event",
    "EventKind",
    "FeatureValue",
    "encode_event",
    "decode_event",
    "decode_events",
    "event_from_dict",
]

SCHEMA_VERSION = 1
EventKind = Literal["impression", "click", "request"]
EVENT_KINDS: tuple[str, ...] = ("impression", "click", "request")
FeatureValue = Union[str, int, float, tuple[str, ...]]

_REQUIRED = ("schema_version", "kind", "event_id", "event_time", "user_id", "request_id")
_OPTIONAL = ("user_features", "item_id", "item_features", "label", "position", "k")
_KNOWN = frozenset(_REQUIRED + _OPTIONAL)
_MAX_ID_LEN = 256


@dataclass(frozen=True)
class Event:
    """One click-stream event. Build it through :func:`event_from_dict` to validate.

    Attributes
    ----------
    kind
        ``"impression"``, ``"click"`` or ``"request"``.
    event_id
        Unique id of this event (used for de-duplication and learn counts).
    event_time
        Event time in seconds since the Unix epoch (UTC).
    user_id, request_id
        Who, and which request the event belongs to.
    user_features, item_features
        Feature name -> value: a category (str), a number (int/float) or a tuple of
        categories (multi-valued, e.g. genres).
    item_id
        The item shown or clicked; ``None`` for requests.
    label
        Impressions: 1 if clicked else 0. Clicks: 1. Requests: ``None``.
    position
        0-based slot where the item was shown; ``None`` for requests.
    k
        Requests only: how many candidates are wanted.
    """

    kind: EventKind
    event_id: str
    event_time: float
    user_id: str
    request_id: str
    user_features: Mapping[str, FeatureValue] = field(default_factory=dict)
    item_id: str | None = None
    item_features: Mapping[str, FeatureValue] = field(default_factory=dict)
    label: int | None = None
    position: int | None = None
    k: int | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # Multi-valued features are tuples, so events compare and hash by value; accept lists.
        for name in ("user_features", "item_features"):
            feats = getattr(self, name)
            if any(isinstance(v, list) for v in feats.values()):
                object.__setattr__(self, name, {k: tuple(v) if isinstance(v, list) else v for k, v in feats.items()})

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record, ``None`` fields left out."""
        d: dict[str, Any] = {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "event_id": self.event_id,
            "event_time": self.event_time,
            "user_id": self.user_id,
            "request_id": self.request_id,
            "user_features": {k: list(v) if isinstance(v, tuple) else v for k, v in self.user_features.items()},
        }
        if self.item_id is not None:
            d["item_id"] = self.item_id
            d["item_features"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.item_features.items()}
        for name in ("label", "position", "k"):
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        return d


def encode_event(event: Event) -> bytes:
    """Serialize an event to JSON bytes (the Kafka record value)."""
    return orjson.dumps(event.to_dict())


def decode_event(raw: bytes | str) -> Event:
    """Parse and validate one record value.

    Raises
    ------
    EventValidationError
        With ``reason`` one of ``json``, ``schema_version``, ``missing_field``, ``type``,
        ``value``, ``unknown_field``.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventValidationError(f"not valid JSON: {exc}", reason="json") from None
    if type(obj) is dict:
        event = _fast_from_dict(obj)
        if event is not None:
            return event
    elif not isinstance(obj, dict):
        raise EventValidationError(
            f"an event must be a JSON object, got {type(obj).__name__}", reason="type"
        )
    return event_from_dict(obj)


def decode_events(raws: Iterable[bytes | str | None]) -> list[Event | Exception]:
    """:func:`decode_event` of each record value, in one call for a batch: the
    :class:`Event`, or the exception that rejected it (an :class:`EventValidationError`
    with its ``reason``, reason ``json`` for ``None``, a tombstone; a ``ValueError``,
    ``TypeError`` or ``OverflowError`` is a validator gap). Lines up with ``raws``.

    >>> ok = encode_event(Event(kind="click", event_id="e", event_time=0, user_id="u",
    ...                         request_id="r", item_id="i", label=1))
    >>> [r.kind if isinstance(r, Event) else r.reason for r in decode_events([ok, b'{"kind": 1}', b'[', None])]
    ['click', 'missing_field', 'json', 'json']
    """
    out: list[Event | Exception] = []
    append, loads, fast = out.append, orjson.loads, _fast_from_dict
    for raw in raws:
        try:
            obj = loads(raw)
        except (orjson.JSONDecodeError, TypeError):
            obj = None  # decode_event below says why
        event = fast(obj) if type(obj) is dict else None
        if event is None:
            try:
                if raw is None:
                    raise EventValidationError("the record has no value (a tombstone?)", reason="json")
                event = event_from_dict(obj) if type(obj) is dict else decode_event(raw)
            except (EventValidationError, ValueError, TypeError, OverflowError) as exc:
                event = exc
        append(event)
    return out


def _require_str(obj: Mapping[str, Any], name: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise EventValidationError(f"field {name!r} must be a string, got {type(value).__name__}", reason="type")
    if not value or len(value) > _MAX_ID_LEN:
        raise EventValidationError(f"field {name!r} must be 1..{_MAX_ID_LEN} characters long", reason="value")
    return value


def _optional_int(obj: Mapping[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventValidationError(f"field {name!r} must be an integer, got {type(value).__name__}", reason="type")
    return value


def _features(obj: Mapping[str, Any], name: str) -> dict[str, FeatureValue]:
    raw = obj.get(name)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EventValidationError(f"field {name!r} must be an object of feature -> value", reason="type")
    out: dict[str, FeatureValue] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise EventValidationError(f"feature {name}.{key} must be finite, got {value}", reason="value")
            out[key] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = tuple(value)
        else:
            raise EventValidationError(
                f"feature {name}.{key} must be a string, a number or a list of strings, got {type(value).__name__}",
                reason="type",
            )
    return out


_FINITE_MAX = 1.7976931348623157e308
_SAFE_INT = 2**53  # an integer event_time below it converts to float exactly, never overflows
_ITEM_SHAPE = frozenset(_REQUIRED + ("user_features", "item_id", "item_features", "label", "position"))
_REQUEST_SHAPE = frozenset(_REQUIRED + ("user_features",))
#: kind -> the key sets the fast path takes: what :func:`encode_event` writes (``None``
#: fields left out). Anything else goes through :func:`event_from_dict`.
_SHAPES: dict[str, tuple[frozenset[str], ...]] = {
    "impression": (_ITEM_SHAPE,),
    "click": (_ITEM_SHAPE, _ITEM_SHAPE - {"position"}, _ITEM_SHAPE - {"label"}, _ITEM_SHAPE - {"label", "position"}),
    "request": (_REQUEST_SHAPE | {"k"}, _REQUEST_SHAPE),
}
_BASE_ORDER = ("schema_version", "kind", "event_id", "event_time", "user_id", "request_id", "user_features")
_ORDERS: dict[tuple[str, ...], frozenset[str]] = {
    _BASE_ORDER + ("item_id", "item_features", "label", "position"): frozenset({"impression", "click"}),
    _BASE_ORDER + ("item_id", "item_features", "label"): frozenset({"click"}),
    _BASE_ORDER + ("k",): frozenset({"request"}),
    _BASE_ORDER: frozenset({"request"}),
}
_COMMON = itemgetter("schema_version", "event_time", "event_id", "user_id", "request_id", "user_features")
_PLAIN = frozenset({str, int})  # feature value types kept as they are (bool is not int here)
_PLAIN_FLOAT_LIST = frozenset({str, int, float, list})


def _fast_features(raw: Any) -> dict[str, FeatureValue] | None:
    """:func:`_features` of ``raw`` when all its values are plain strings, ints, finite
    floats or lists of strings (``raw`` itself, or a copy with tuples for the lists);
    ``None`` for anything else (then the full validator decides). ``raw`` is not changed."""
    if type(raw) is not dict:
        return None
    types = set(map(type, raw.values()))
    if types <= _PLAIN:
        return raw
    if not types <= _PLAIN_FLOAT_LIST:
        return None
    out = {}
    for key, value in raw.items():
        t = type(value)
        if t is list:
            for v in value:
                if type(v) is not str:
                    return None
            value = tuple(value)
        elif t is float and not -_FINITE_MAX <= value <= _FINITE_MAX:  # NaN fails both
            return None
        out[key] = value
    return out


def _fast_from_dict(obj: dict[str, Any]) -> Event | None:
    """The :class:`Event` of a decoded record in one of the common valid shapes, checked
    with exact types; ``None`` (``obj`` untouched) when any check fails: then
    :func:`event_from_dict` decides and gives the reason. Accepts nothing that
    :func:`event_from_dict` rejects and builds an equal event; ``obj`` becomes its
    ``__dict__``."""
    kind = obj.get("kind")
    kinds = _ORDERS.get(tuple(obj))  # the key orders encode_event writes: no set to build
    if kinds is None:
        shapes = _SHAPES.get(kind) if type(kind) is str else None
        if shapes is None or not any(obj.keys() == shape for shape in shapes):
            return None
    elif type(kind) is not str or kind not in kinds:
        return None
    version, t, a, b, c, user_features = _COMMON(obj)
    if type(version) is not int or version != SCHEMA_VERSION:
        return None
    if type(t) is float:
        if not 0.0 <= t <= _FINITE_MAX:  # NaN fails
            return None
    elif type(t) is not int or not 0 <= t < _SAFE_INT:
        return None
    if not (type(a) is str and type(b) is str and type(c) is str
            and 0 < len(a) <= _MAX_ID_LEN and 0 < len(b) <= _MAX_ID_LEN and 0 < len(c) <= _MAX_ID_LEN):
        return None
    user_features = _fast_features(user_features)
    if user_features is None:
        return None
    if kind == "request":
        k = obj.get("k")
        if k is not None and (type(k) is not int or not 1 <= k <= 10_000):
            return None
        label = position = item_id = None
        item_features: dict[str, FeatureValue] | None = {}
    else:
        label, position, k, item_id = obj.get("label", 1), obj.get("position"), None, obj["item_id"]
        if type(label) is not int or label != 1 and (kind == "click" or label != 0):
            return None
        if position is None:
            if kind == "impression":
                return None
        elif type(position) is not int or position < 0:
            return None
        if type(item_id) is not str or not 0 < len(item_id) <= _MAX_ID_LEN:
            return None
        item_features = _fast_features(obj["item_features"])
        if item_features is None:
            return None
    # valid: obj becomes the event's fields
    obj["event_time"] = float(t)
    obj["user_features"], obj["item_id"], obj["item_features"] = user_features, item_id, item_features
    obj["label"], obj["position"], obj["k"] = label, position, k
    event = object.__new__(Event)
    object.__setattr__(event, "__dict__", obj)
    return event


def _fast_event(**fields: Any) -> Event:
    """Build an already validated :class:`Event` without the frozen dataclass's per-field
    ``object.__setattr__`` calls (about 3 us of the ~12 us a decode costs)."""
    event = object.__new__(Event)
    event.__dict__.update(fields)
    return event


def event_from_dict(obj: Mapping[str, Any]) -> Event:
    """Validate a decoded record and build the :class:`Event`.

    >>> event_from_dict({"schema_version": 1, "kind": "request", "event_id": "e",
    ...                  "event_time": 0, "user_id": "u", "request_id": "r", "k": 10}).k
    10
    """
    if "schema_version" not in obj:
        raise EventValidationError(
            f"missing field 'schema_version' (every event must carry \"schema_version\": {SCHEMA_VERSION})",
            reason="missing_field",
        )
    version = obj["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise EventValidationError(
            f"unsupported schema_version {version!r}: this consumer reads version {SCHEMA_VERSION}; "
            "upgrade towerstream or re-encode the event",
            reason="schema_version",
        )
    missing = [name for name in _REQUIRED if name not in obj]
    if missing:
        raise EventValidationError(f"missing field(s) {', '.join(missing)}", reason="missing_field")
    unknown = sorted(set(obj) - _KNOWN)
    if unknown:
        raise EventValidationError(
            f"unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(_KNOWN))}",
            reason="unknown_field",
        )
    kind = obj["kind"]
    if kind not in EVENT_KINDS:
        raise EventValidationError(f"kind must be one of {', '.join(EVENT_KINDS)}, got {kind!r}", reason="value")
    event_time = obj["event_time"]
    if isinstance(event_time, bool) or not isinstance(event_time, (int, float)):
        raise EventValidationError(
            f"field 'event_time' must be a number (seconds since the epoch), got {type(event_time).__name__}",
            reason="type",
        )
    if not math.isfinite(event_time) or event_time < 0:
        raise EventValidationError(f"field 'event_time' must be a finite number >= 0, got {event_time}", reason="value")

    label = _optional_int(obj, "label")
    position = _optional_int(obj, "position")
    k = _optional_int(obj, "k")
    item_id = obj.get("item_id")
    if kind == "request":
        if item_id is not None or label is not None or position is not None:
            raise EventValidationError("a request carries no item_id, label or position", reason="value")
        if k is not None and not 1 <= k <= 10_000:
            raise EventValidationError(f"field 'k' must be in 1..10000, got {k}", reason="value")
    else:
        if item_id is None:
            raise EventValidationError(f"missing field item_id (required for a {kind})", reason="missing_field")
        item_id = _require_str(obj, "item_id")
        if k is not None:
            raise EventValidationError(f"field 'k' belongs to requests, not to a {kind}", reason="value")
        if kind == "impression":
            if label is None or position is None:
                raise EventValidationError(
                    "an impression needs 'label' (0 or 1) and 'position' (>= 0)", reason="missing_field"
                )
        elif label is None:
            label = 1
        if label not in (0, 1) or (kind == "click" and label != 1):
            raise EventValidationError(f"label must be 0 or 1 (1 for a click), got {label}", reason="value")
        if position is not None and position < 0:
            raise EventValidationError(f"position must be >= 0, got {position}", reason="value")

    return _fast_event(
        kind=kind,
        event_id=_require_str(obj, "event_id"),
        event_time=float(event_time),
        user_id=_require_str(obj, "user_id"),
        request_id=_require_str(obj, "request_id"),
        user_features=_features(obj, "user_features"),
        item_id=item_id,
        item_features=_features(obj, "item_features") if kind != "request" else {},
        label=label,
        position=position,
        k=k,
        schema_version=SCHEMA_VERSION,
    )
