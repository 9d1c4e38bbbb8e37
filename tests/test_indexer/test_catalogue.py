"""The item catalogue: latest features win, snapshots are stable, bad files change nothing."""

from __future__ import annotations

import pytest

from indexer.catalogue import Catalogue
from indexer.errors import CatalogueError
from streams.events import Event


def _impression(item_id: str, **features: object) -> Event:
    return Event(kind="impression", event_id=f"e-{item_id}", event_time=1.0, user_id="u1", request_id="r1",
                 item_id=item_id, item_features=features, label=0, position=0)


def test_stream_items_enter_with_latest_features_and_first_seen_time() -> None:
    now = [100.0]
    cat = Catalogue(clock=lambda: now[0])
    assert cat.observe_event(_impression("i1", genre="Drama")) is True
    now[0] = 105.0
    assert cat.observe_event(_impression("i1", genre="Comedy")) is False  # known item, new features
    assert cat.observe_event(_impression("i2")) is True
    request = Event(kind="request", event_id="q", event_time=1.0, user_id="u1", request_id="r2", k=5)
    assert cat.observe_event(request) is False
    snap = cat.snapshot()
    assert snap.ids == ("i1", "i2")
    assert snap.xs[0] == {"item_id": "i1", "i:genre": "Comedy"}
    assert (cat.first_seen("i1"), cat.first_seen("i2"), cat.first_seen("nope")) == (100.0, 105.0, None)


def test_revision_changes_only_when_contents_change() -> None:
    cat = Catalogue()
    cat.upsert("i1", {"a": 1})
    r = cat.revision
    cat.upsert("i1", {"a": 1})
    assert cat.revision == r
    cat.upsert("i1", {"a": 2})
    assert cat.revision == r + 1


def test_snapshot_is_not_affected_by_later_updates() -> None:
    cat = Catalogue()
    cat.upsert("i1", {"a": 1})
    snap = cat.snapshot()
    cat.upsert("i1", {"a": 2})
    cat.upsert("i2", {})
    assert snap.ids == ("i1",) and snap.xs[0]["i:a"] == 1


def test_jsonl_file_loads_and_a_bad_line_loads_nothing(tmp_path) -> None:
    good = tmp_path / "items.jsonl"
    good.write_text('{"item_id": "i1", "item_features": {"genres": ["A", "B"]}}\n\n{"item_id": "i2"}\n')
    cat = Catalogue()
    assert cat.load_jsonl(good) == 2
    assert cat.snapshot().xs[0] == {"item_id": "i1", "i:genres": ("A", "B")}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "i3"}\n{"item_id": "i4", "item_features": {"x": {"nested": 1}}}\n')
    with pytest.raises(CatalogueError, match=r"bad.jsonl:2"):
        cat.load_jsonl(bad)
    assert "i3" not in cat and len(cat) == 2
