"""The fast decode path and the batch decoder agree with the full validator, record for record.

``decode_event`` and ``decode_events`` take a shortcut for records in the shapes
``encode_event`` writes; every other record goes through ``event_from_dict``. Whatever
the record, the outcome must be the full validator's: the same event, or the same
rejection (type, reason and message).
"""

from __future__ import annotations

import copy
import random

import json

import orjson
import pytest

from streams.errors import EventValidationError
from streams.events import Event, decode_event, decode_events, encode_event, event_from_dict
from streams.simulator import ClickSimulator, SimulatorConfig

ODD_VALUES = [None, True, False, 0, 1, -1, 2, 10_000, 10_001, 2**53, 2**70, -0.0, 0.0, 1.0, 1.5, -2.5, 1e308,
              "", "x", "y" * 257, [], ["a"], ["a", 1], [["a"]], {}, {"a": "b"}, "impression", "click", "request"]


def _reference(raw: bytes) -> str | tuple[str, str, str]:
    """What the full validator makes of ``raw``: the event, or (exception type, reason, message)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return ("EventValidationError", "json", f"not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return ("EventValidationError", "type", f"an event must be a JSON object, got {type(obj).__name__}")
    try:
        return _typed(event_from_dict(obj))
    except EventValidationError as exc:
        return ("EventValidationError", exc.reason, str(exc))
    except (ValueError, TypeError, OverflowError) as exc:
        return (type(exc).__name__, "", str(exc))


def _typed(event: Event) -> str:
    """The event's fields with their types (``True`` is not ``1``, a tuple not a list)."""
    return repr(sorted(vars(event).items()))


def _outcome(result: Event | Exception) -> str | tuple[str, str, str]:
    if isinstance(result, Event):
        return _typed(result)
    return (type(result).__name__, getattr(result, "reason", ""), str(result))


def _mutants(rng: random.Random, base: list[dict], n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        d = copy.deepcopy(rng.choice(base))
        for _ in range(rng.choice([1, 1, 2])):
            r = rng.random()
            target = d
            if r < 0.3 and isinstance(d.get("user_features"), dict) and d["user_features"]:
                target = d["user_features"]
            elif r < 0.5 and isinstance(d.get("item_features"), dict) and d["item_features"]:
                target = d["item_features"]
            if rng.random() < 0.15 and target:
                del target[rng.choice(sorted(target))]
            elif rng.random() < 0.1:
                target[rng.choice(["extra", "k", "label", "position", "item_id", "item_features"])] = rng.choice(ODD_VALUES)
            elif target:
                target[rng.choice(sorted(target))] = rng.choice(ODD_VALUES)
        out.append(json.dumps(d).encode())
    return out


@pytest.fixture(scope="module")
def sim_records() -> list[bytes]:
    return [encode_event(e) for e in ClickSimulator(SimulatorConfig(seed=3)).events(max_events=3000)]


def test_valid_records_decode_to_the_same_events_as_the_full_validator(sim_records: list[bytes]) -> None:
    kinds = set()
    for raw, got in zip(sim_records, decode_events(sim_records)):
        expected = event_from_dict(orjson.loads(raw))
        assert got == expected and decode_event(raw) == expected and _typed(got) == _typed(expected)
        assert type(got.event_time) is float and all(type(v) is tuple for v in got.item_features.values()
                                                      if not isinstance(v, (str, int, float)))
        assert vars(got).keys() == vars(expected).keys()  # no extra attribute from the record
        kinds.add(got.kind)
    assert kinds == {"impression", "click", "request"}


def test_hand_written_shapes_take_the_same_decisions() -> None:
    base = {"schema_version": 1, "event_id": "e", "event_time": 5, "user_id": "u", "request_id": "r",
            "user_features": {"a": "x", "n": 3, "f": 0.5, "g": ["p", "q"]}}
    cases = [
        {**base, "kind": "request"},
        {**base, "kind": "request", "k": 10},
        {**base, "kind": "request", "k": None},
        {**base, "kind": "request", "k": 0},
        {**base, "kind": "click", "item_id": "i", "item_features": {}},  # label defaults to 1
        {**base, "kind": "click", "item_id": "i", "item_features": {}, "label": 0},
        {**base, "kind": "click", "item_id": "i", "item_features": {}, "label": None, "position": None},
        {**base, "kind": "impression", "item_id": "i", "item_features": {}, "label": 0, "position": None},
        {**base, "kind": "impression", "item_id": "i", "item_features": {}, "label": 1, "position": 0},
        {**base, "kind": "impression", "item_id": "i", "item_features": {"t": True}, "label": 1, "position": 0},
        {**base, "kind": "impression", "item_id": "i", "item_features": {"t": [1]}, "label": 1, "position": 0},
        {**base, "kind": "impression", "item_id": "i", "item_features": {"t": ["a"]}, "label": 2, "position": 0},
        {**base, "kind": "impression", "item_id": "i", "item_features": {}, "label": True, "position": 0},
        {**base, "kind": "impression", "item_id": "i", "item_features": {}, "label": 1, "position": -1},
        {**base, "kind": "impression", "item_id": "i", "item_features": {}, "label": 1, "position": 0,
         "event_time": 2**70},
        {**base, "kind": "impression", "item_id": "i", "item_features": {}, "label": 1, "position": 0,
         "schema_version": 1.0},
        {**base, "kind": "impression", "item_id": "i", "item_features": {}, "label": 1, "position": 0,
         "user_features": {"g": ["p", "q"], "bad": None}},
    ]
    in_order = {"schema_version": 1, "kind": ["impression"], "event_id": "e", "event_time": 5, "user_id": "u",
                "request_id": "r", "user_features": {}, "item_id": "i", "item_features": {}, "label": 1, "position": 0}
    cases += [in_order, {**in_order, "kind": "request"}, {**in_order, "kind": "click", "label": 0}]
    raws = [json.dumps(c).encode() for c in cases] + [b'{"event_time": 1e999}', b"[1]", b"not json", b'"s"']
    for raw, got in zip(raws, decode_events(raws)):
        expected = _reference(raw) if raw.startswith(b"{") else None
        if expected is not None:
            assert _outcome(got) == expected, raw
        with pytest.raises(EventValidationError) if not isinstance(got, Event) else _nothing():
            assert decode_event(raw) == got
    # the accepted user features: lists became tuples, numbers kept, in their order
    first = decode_events(raws[:1])[0]
    assert isinstance(first, Event) and first.user_features == {"a": "x", "n": 3, "f": 0.5, "g": ("p", "q")}
    assert list(first.user_features) == ["a", "n", "f", "g"] and first.event_time == 5.0


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_mutated_records_get_the_full_validators_outcome(sim_records: list[bytes]) -> None:
    rng = random.Random(11)
    base = [orjson.loads(r) for r in sim_records[:300]]
    raws = _mutants(rng, base, 4000)
    accepted = rejected = 0
    for raw, got in zip(raws, decode_events(raws)):
        expected = _reference(raw)
        assert _outcome(got) == expected, raw
        if isinstance(got, Event):
            accepted += 1
            assert decode_event(raw) == got
        else:
            rejected += 1
    assert accepted > 300 and rejected > 1000  # both sides of every check were exercised


def test_a_tombstone_and_bad_json_are_rejected_with_reason_json() -> None:
    tomb, bad = decode_events([None, b"{"])
    assert isinstance(tomb, EventValidationError) and tomb.reason == "json" and "tombstone" in str(tomb)
    assert isinstance(bad, EventValidationError) and bad.reason == "json"
