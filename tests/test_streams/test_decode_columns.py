"""The columnar decoder (msgspec) agrees with the per-event path, record for record.

Whatever the record, :func:`streams.columns.decode_columns` must give the full validator's
outcome: a row equal (field types included) to the event :func:`decode_events` builds, or
a reject with the same exception type, reason and message.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from streams.columns import EMPTY_BLOCK, KIND_CODES, NO_BLOCK, NO_VALUE, EventColumns, FeatureBlocks, decode_columns
from streams.events import Event, decode_events, encode_event
from streams.simulator import ClickSimulator, SimulatorConfig

sys.path.insert(0, str(Path(__file__).parent))  # the per-event decoder's test: its mutation generator
from test_decode_batch import _mutants, _outcome, _typed  # noqa: E402


@pytest.fixture(scope="module")
def sim_records() -> list[bytes]:
    return [encode_event(e) for e in ClickSimulator(SimulatorConfig(seed=5)).events(max_events=3000)]


def _check_same_as_per_event(raws: list) -> tuple[int, int]:
    cols, rejects = decode_columns(raws)
    reference = decode_events(raws)
    got: dict[int, object] = {int(i): cols.event(row) for row, i in enumerate(cols.source)}
    got.update({i: exc for i, exc in rejects})
    assert sorted(got) == list(range(len(raws)))  # every record is a row or a reject, once
    assert cols.source.tolist() == sorted(cols.source.tolist())
    for i, ref in enumerate(reference):
        assert _outcome(got[i]) == _outcome(ref), raws[i]
    return len(cols), len(rejects)


def test_valid_records_become_the_same_events(sim_records: list[bytes]) -> None:
    n, dead = _check_same_as_per_event(sim_records)
    assert n == len(sim_records) and dead == 0
    cols, _ = decode_columns(sim_records)
    events = decode_events(sim_records)
    assert cols.kind.tolist() == [KIND_CODES[e.kind] for e in events]
    assert cols.label.tolist() == [NO_VALUE if e.label is None else e.label for e in events]
    assert cols.position.tolist() == [NO_VALUE if e.position is None else e.position for e in events]
    assert cols.event_time.dtype == np.float64 and cols.event_time.tolist() == [e.event_time for e in events]
    assert set(cols.kind.tolist()) == set(KIND_CODES.values())


def test_mutated_records_get_the_per_event_outcome(sim_records: list[bytes]) -> None:
    rng = random.Random(23)
    base = [orjson.loads(r) for r in sim_records[:300]]
    raws = _mutants(rng, base, 4000)
    n, dead = _check_same_as_per_event(raws)
    assert n > 300 and dead > 1000  # both sides of every check were exercised


def test_edge_records_get_the_per_event_outcome() -> None:
    imp = {"schema_version": 1, "kind": "impression", "event_id": "e", "event_time": 5, "user_id": "u",
           "request_id": "r", "user_features": {"a": "x", "n": 3}, "item_id": "i",
           "item_features": {"g": ["p", "q"], "f": 0.5}, "label": 1, "position": 0}
    req = {"schema_version": 1, "kind": "request", "event_id": "e", "event_time": 5.5, "user_id": "u",
           "request_id": "r", "k": 10}
    cases = [
        imp, req,
        {**imp, "schema_version": 2}, {**imp, "schema_version": True}, {**imp, "schema_version": "1"},
        {k: v for k, v in imp.items() if k != "user_id"}, {k: v for k, v in imp.items() if k != "schema_version"},
        {**imp, "label": "1"}, {**imp, "position": 1.0}, {**imp, "event_time": "now"}, {**imp, "event_time": -1},
        {**imp, "user_id": "u" * 256}, {**imp, "user_id": "u" * 257}, {**imp, "item_id": ""},
        {**imp, "user_features": {"big": 2**63 - 1, "bigger": 2**63, "huge": 2**64 - 1, "t": True}},
        {**imp, "position": 2**63}, {**imp, "position": 2**64 - 1}, {**imp, "k": None}, {**imp, "k": 3},
        {**req, "item_id": None, "label": None, "position": None}, {**req, "item_features": [1, {"x": None}]},
        {**req, "item_id": "i"}, {**req, "k": 10_001}, {**req, "k": None},
        {**imp, "kind": "click", "label": None}, {**imp, "kind": "click", "label": 0},
        {**imp, "kind": "bogus"}, {**imp, "extra": 1},
        # oversized: a 1 MB record with many features is valid; a 300 kB id is not
        {**imp, "user_features": {f"f{j}": "v" * 100 for j in range(10_000)}},
        {**imp, "event_id": "e" * 300_000},
    ]
    raws: list = [json.dumps(c).encode() for c in cases]
    raws += [
        None, b"", b"{", b"[1]", b'"s"', b"null", b"not json", b'{"event_time": 1e999}',
        json.dumps(imp).encode() + b" x",  # trailing garbage
        b'{"kind": "request", ' + json.dumps(imp).encode()[1:],  # duplicate kind: the last wins
        json.dumps(imp).encode().replace(b'"u"', b'"\\ud800"'),  # lone surrogate
        json.dumps(imp).encode().replace(b'"u"', b'"\xff"'),  # invalid UTF-8
        json.dumps(imp).encode().replace(b'"event_time": 5', b'"event_time": 1' + b"0" * 400),
        json.dumps(imp),  # str, not bytes
    ]
    n, dead = _check_same_as_per_event(raws)
    assert n >= 8 and dead >= 20


def test_take_of_kind_and_from_events_round_trip(sim_records: list[bytes]) -> None:
    cols, _ = decode_columns(sim_records[:500])
    imps = cols.of_kind("impression")
    events = decode_events(sim_records[:500])
    expected = [e for e in events if e.kind == "impression"]
    assert 0 < len(imps) < len(cols) and imps.events() == expected
    assert imps.source.tolist() == [i for i, e in enumerate(events) if e.kind == "impression"]
    again = EventColumns.from_events(events)
    assert again.events() == events and _typed(again.event(3)) == _typed(events[3])
    assert cols.take(slice(10, 20)).events() == events[10:20]
    assert all(isinstance(e, Event) for e in cols.take(np.array([5, 1])).events())
    assert cols.take(np.array([5, 1])).events() == [events[5], events[1]]


def _mappings_by_block(cols: EventColumns, seen: dict[int, dict]) -> None:
    """Every row's block id denotes one mapping: the same id is the same dict object (also
    across batches, through ``seen``), and a different id is a different object."""
    for side in ("user", "item"):
        for block, features in zip(getattr(cols, f"{side}_block").tolist(), getattr(cols, f"{side}_features")):
            assert block != NO_BLOCK
            if block in seen:
                assert seen[block] is features
            seen[block] = features
    by_object: dict[int, int] = {}
    for side in ("user", "item"):
        for block, features in zip(getattr(cols, f"{side}_block").tolist(), getattr(cols, f"{side}_features")):
            assert by_object.setdefault(id(features), block) == block


def test_feature_mappings_are_interned_once_per_distinct_object(sim_records: list[bytes]) -> None:
    blocks = FeatureBlocks()
    cols, _ = decode_columns(sim_records, blocks)
    events = decode_events(sim_records)
    assert [dict(f) for f in cols.user_features] == [e.user_features for e in events]
    seen: dict = {}
    _mappings_by_block(cols, seen)
    # the simulator repeats its users' and items' features: far fewer mappings than rows
    distinct = len(set(cols.user_block.tolist())) + len(set(cols.item_block.tolist()))
    assert len(blocks) == distinct and distinct < len(cols) / 2
    # a later batch with the same objects gets the same ids and the same dicts
    again, _ = decode_columns(sim_records[:200], blocks)
    assert again.user_block.tolist() == cols.user_block[:200].tolist()
    _mappings_by_block(again, seen)
    # an Event built from a row owns its mappings: changing one leaves the interned dict alone
    event = cols.event(0)
    event.user_features["changed"] = "yes"
    assert "changed" not in cols.user_features[0]
    # the validator's rows (msgspec refuses a boolean feature, the validator takes it) are not interned
    odd = orjson.loads(sim_records[0])
    odd["user_features"] = {"flag": True}
    mixed, rejects = decode_columns([orjson.dumps(odd), sim_records[1]], blocks)
    assert not rejects and mixed.user_block[0] == NO_BLOCK and mixed.user_block[1] != NO_BLOCK
    assert mixed.events() == decode_events([orjson.dumps(odd), sim_records[1]])


def test_a_full_block_table_clears_without_reusing_an_id(sim_records: list[bytes]) -> None:
    blocks = FeatureBlocks(max_blocks=16)
    seen: dict = {}
    ids_to_content: dict[int, dict] = {}
    for start in range(0, 1500, 100):
        cols, _ = decode_columns(sim_records[start:start + 100], blocks)
        assert len(blocks) <= 16 + 1  # the empty mapping is always there
        assert cols.events() == decode_events(sim_records[start:start + 100])
        for block, features in zip(cols.user_block.tolist() + cols.item_block.tolist(),
                                   cols.user_features + cols.item_features):
            assert ids_to_content.setdefault(block, features) == features  # an id never changes meaning
    assert max(ids_to_content) > 16  # the table did clear and go on with fresh ids
    # another table of the same process never hands out an id the first one gave
    other, _ = decode_columns(sim_records[:100], FeatureBlocks())
    fresh = set(other.user_block.tolist() + other.item_block.tolist()) - {EMPTY_BLOCK}
    assert fresh and not fresh & set(ids_to_content)
