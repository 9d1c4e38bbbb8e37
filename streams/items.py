"""Item events: a new item, changed item features, or a retired item.

They travel on their own topic (``<prefix>.items``, :attr:`streams.topics.Topics.items`),
keyed by item id so all events of one item stay in order, and are what the indexer
applies to the live index between full rebuilds (:mod:`indexer.delta`).

>>> e = ItemEvent(op="upsert", item_id="i9", event_time=12.5, features={"topic": "t3"})
>>> decode_item_event(encode_item_event(e)) == e
True
>>> decode_item_event(b'{"op": "delete", "item_id": "i9", "event_time": 1.0}')
Traceback (most recent call last):
...
streams.items.ItemEventError: item event op 'delete' is not one of upsert, retire
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import orjson

from streams.errors import EventValidationError
from streams.events import _features

__all__ = ["ItemEvent", "ItemEventError", "encode_item_event", "decode_item_event", "key_for_item"]

ItemOp = Literal["upsert", "retire"]
_OPS = ("upsert", "retire")


class ItemEventError(ValueError):
    """An item record that cannot be decoded or validated; the message is the reason."""


@dataclass(frozen=True)
class ItemEvent:
    """One change to the catalogue.

    Attributes
    ----------
    op
        ``"upsert"`` (a new item or new features of a known one) or ``"retire"``.
    item_id
        The item.
    event_time
        Seconds since the epoch when the change happened (the freshness clock starts here).
    features
        The item's features (``upsert``); empty for ``retire``.
    """

    op: ItemOp
    item_id: str
    event_time: float
    features: Mapping[str, Any] = field(default_factory=dict)


def key_for_item(item_id: str) -> bytes:
    """The message key of an item event: its item id, UTF-8 encoded."""
    return item_id.encode("utf-8")


def encode_item_event(event: ItemEvent) -> bytes:
    """JSON bytes of ``event``."""
    return orjson.dumps({"op": event.op, "item_id": event.item_id, "event_time": event.event_time,
                         "features": dict(event.features)})


def decode_item_event(raw: bytes | None) -> ItemEvent:
    """Decode and validate one item record.

    Raises
    ------
    ItemEventError
        If the bytes are not a JSON object with a valid ``op``, a non-empty string
        ``item_id``, a finite ``event_time`` and (optionally) an object ``features``.
    """
    if raw is None:
        raise ItemEventError("item record has no value (tombstone)")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ItemEventError(f"item record is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ItemEventError("item record is not a JSON object")
    op = obj.get("op")
    if op not in _OPS:
        raise ItemEventError(f"item event op {op!r} is not one of {', '.join(_OPS)}")
    item_id = obj.get("item_id")
    if not isinstance(item_id, str) or not item_id:
        raise ItemEventError("item event needs a non-empty string item_id")
    t = obj.get("event_time")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ItemEventError(f"item event {item_id}: event_time {t!r} is not a finite number")
    try:  # the click events' feature rules: strings, finite numbers, lists of strings (as tuples)
        features = _features(obj, "features")
    except EventValidationError as exc:
        raise ItemEventError(f"item event {item_id}: {exc}") from None
    return ItemEvent(op=op, item_id=item_id, event_time=float(t), features=features)
