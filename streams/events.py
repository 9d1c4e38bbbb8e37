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
from typing import Any, Literal, Mapping, Union

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
    if not isinstance(obj, dict):
        raise EventValidationError(
            f"an event must be a JSON object, got {type(obj).__name__}", reason="type"
        )
    return event_from_dict(obj)


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
