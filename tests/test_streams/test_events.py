"""The event contract: round trips of every kind, and each validation rule's reason."""

from __future__ import annotations

import orjson
import pytest

from streams.errors import EventValidationError
from streams.events import SCHEMA_VERSION, Event, decode_event, encode_event, event_from_dict


def _impression(**overrides):
    d = {
        "schema_version": SCHEMA_VERSION, "kind": "impression", "event_id": "e1", "event_time": 1.7e9,
        "user_id": "u1", "request_id": "r1", "user_features": {"age": "25-34", "activity": 0.5},
        "item_id": "i9", "item_features": {"category": "c3", "tags": ["a", "b"]}, "label": 0, "position": 2,
    }
    d.update(overrides)
    return d


@pytest.mark.parametrize("record", [
    _impression(),
    _impression(kind="click", label=1),
    {"schema_version": 1, "kind": "request", "event_id": "q", "event_time": 5, "user_id": "u",
     "request_id": "r", "user_features": {"age": "18-24"}, "k": 50},
])
def test_every_kind_round_trips(record):
    event = decode_event(orjson.dumps(record))
    assert event.kind == record["kind"]
    assert decode_event(encode_event(event)) == event
    assert orjson.loads(encode_event(event))["schema_version"] == SCHEMA_VERSION


def test_multi_valued_features_become_tuples():
    event = decode_event(orjson.dumps(_impression()))
    assert event.item_features["tags"] == ("a", "b")
    built = Event(kind="click", event_id="e", event_time=0.0, user_id="u", request_id="r",
                  item_id="i", item_features={"tags": ["x"]}, label=1)
    assert built.item_features["tags"] == ("x",)


def test_click_label_defaults_to_one():
    record = _impression(kind="click")
    del record["label"]
    assert decode_event(orjson.dumps(record)).label == 1


@pytest.mark.parametrize("raw, reason, fragment", [
    (b"{not json", "json", "not valid JSON"),
    (b"[1, 2]", "type", "JSON object"),
    (orjson.dumps(_impression(schema_version=2)), "schema_version", "unsupported schema_version 2"),
    (orjson.dumps({k: v for k, v in _impression().items() if k != "schema_version"}), "missing_field", "schema_version"),
    (orjson.dumps({k: v for k, v in _impression().items() if k != "user_id"}), "missing_field", "user_id"),
    (orjson.dumps({k: v for k, v in _impression().items() if k != "label"}), "missing_field", "label"),
    (orjson.dumps({k: v for k, v in _impression().items() if k != "item_id"}), "missing_field", "item_id"),
    (orjson.dumps(_impression(extra=1)), "unknown_field", "extra"),
    (orjson.dumps(_impression(kind="view")), "value", "kind must be one of"),
    (orjson.dumps(_impression(user_id=42)), "type", "'user_id' must be a string"),
    (orjson.dumps(_impression(user_id="")), "value", "'user_id' must be 1..256"),
    (orjson.dumps(_impression(event_time="yesterday")), "type", "event_time"),
    (orjson.dumps(_impression(event_time=-1)), "value", "event_time"),
    (orjson.dumps(_impression(label=2)), "value", "label must be 0 or 1"),
    (orjson.dumps(_impression(label=True)), "type", "'label' must be an integer"),
    (orjson.dumps(_impression(kind="click", label=0)), "value", "label must be 0 or 1"),
    (orjson.dumps(_impression(position=-1)), "value", "position must be >= 0"),
    (orjson.dumps(_impression(position=1.5)), "type", "'position' must be an integer"),
    (orjson.dumps(_impression(k=10)), "value", "belongs to requests"),
    (orjson.dumps(_impression(user_features={"age": {"nested": 1}})), "type", "user_features.age"),
    (orjson.dumps(_impression(item_features={"tags": ["a", 3]})), "type", "item_features.tags"),
    (orjson.dumps(_impression(user_features=["age"])), "type", "user_features"),
    (orjson.dumps({"schema_version": 1, "kind": "request", "event_id": "q", "event_time": 1,
                   "user_id": "u", "request_id": "r", "item_id": "i"}), "value", "no item_id"),
    (orjson.dumps({"schema_version": 1, "kind": "request", "event_id": "q", "event_time": 1,
                   "user_id": "u", "request_id": "r", "k": 0}), "value", "'k' must be in"),
])
def test_invalid_records_name_their_reason(raw, reason, fragment):
    with pytest.raises(EventValidationError) as info:
        decode_event(raw)
    assert info.value.reason == reason
    assert fragment in str(info.value)


def test_non_finite_feature_is_rejected():
    with pytest.raises(EventValidationError, match="finite"):
        event_from_dict(_impression(user_features={"activity": float("nan")}))
