"""The item catalogue: every item the indexer must serve, with its latest features.

Items come from two places: the click stream (every impression or click names an item
and carries its features) and, optionally, a catalogue file (JSON lines) for items that
were never shown yet. The newest record of an item wins. The catalogue is shared
between the thread that follows the stream and the builder, so it is guarded by a lock
and read through an immutable :class:`CatalogueSnapshot`.

>>> from streams.events import Event
>>> cat = Catalogue(clock=lambda: 10.0)
>>> cat.upsert("i1", {"genre": "Drama"})
True
>>> cat.observe_event(Event(kind="click", event_id="e", event_time=1.0, user_id="u",
...                         request_id="r", item_id="i1", item_features={"genre": "Comedy"}))
False
>>> snap = cat.snapshot()
>>> snap.ids, snap.xs[0]
(('i1',), {'item_id': 'i1', 'i:genre': 'Comedy'})
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import orjson

from indexer.errors import CatalogueError
from learners.base import ITEM_PREFIX
from streams.events import Event, FeatureValue
from streams.items import ItemEvent

__all__ = ["Catalogue", "CatalogueSnapshot", "item_x"]


def item_x(item_id: str, features: Mapping[str, FeatureValue]) -> dict[str, FeatureValue]:
    """The item example a two-tower item tower encodes: ``item_id`` plus ``i:<feature>``.

    >>> item_x("i7", {"year": 1995})
    {'item_id': 'i7', 'i:year': 1995}
    """
    x: dict[str, FeatureValue] = {"item_id": item_id}
    for name, value in features.items():
        x[ITEM_PREFIX + name] = value
    return x


@dataclass(frozen=True)
class CatalogueSnapshot:
    """The catalogue at one moment, in insertion order (stable between builds).

    Attributes
    ----------
    ids
        Item ids, shape (N,).
    xs
        Item examples (``item_x``) in the same order; what ``encode_items`` takes.
    revision
        Increases whenever an item is added or its features change.
    items_seq
        The item-log sequence (``<prefix>.items`` offset + 1) this snapshot reflects: a
        version built from it covers every item event up to here, so a scorer replays
        only the later ones on it (0: no item event yet).
    """

    ids: tuple[str, ...]
    xs: tuple[dict[str, FeatureValue], ...]
    revision: int
    items_seq: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def _clean_features(raw: Any, where: str) -> dict[str, FeatureValue]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise CatalogueError(f"{where}: 'item_features' must be an object of feature -> value")
    out: dict[str, FeatureValue] = {}
    for key, value in raw.items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[str(key)] = tuple(value)
        elif isinstance(value, bool):
            out[str(key)] = int(value)
        elif isinstance(value, (str, int, float)):
            out[str(key)] = value
        else:
            raise CatalogueError(
                f"{where}: feature {key!r} must be a string, a number or a list of strings, "
                f"got {type(value).__name__}"
            )
    return out


class Catalogue:
    """Item id -> latest item features, thread-safe.

    Parameters
    ----------
    clock
        Time source for ``first_seen`` (seconds); injected so tests control it.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._features: dict[str, dict[str, FeatureValue]] = {}
        self._xs: dict[str, dict[str, FeatureValue]] = {}  # item_x, built once per change
        self._first_seen: dict[str, float] = {}
        self._retired: set[str] = set()  # retired by an item event: the click stream cannot revive them
        self._revision = 0
        self._items_seq = 0

    def __len__(self) -> int:
        return len(self._features)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._features

    @property
    def revision(self) -> int:
        """A counter bumped by every change; equal revisions mean equal contents."""
        return self._revision

    def upsert(self, item_id: str, features: Mapping[str, FeatureValue]) -> bool:
        """Record an item's latest features (unprefixed names). Returns True if it is new."""
        if not isinstance(item_id, str) or not item_id:
            raise CatalogueError(f"item_id must be a non-empty string, got {item_id!r}")
        feats = dict(features)
        with self._lock:
            old = self._features.get(item_id)
            if old == feats:
                return False
            self._features[item_id] = feats
            self._xs[item_id] = item_x(item_id, feats)
            self._revision += 1
            if old is None:
                self._first_seen[item_id] = self.clock()
                return True
            return False

    def retire(self, item_id: str) -> bool:
        """Remove an item; later impressions of it (stragglers) do not bring it back, only an
        upsert item event does. Returns True if it was in the catalogue."""
        with self._lock:
            self._retired.add(item_id)
            present = self._features.pop(item_id, None) is not None
            self._xs.pop(item_id, None)
            if present:
                self._revision += 1
            return present

    def observe_item_event(self, event: ItemEvent, seq: int) -> bool:
        """Apply one item event read at item-log sequence ``seq`` (offset + 1). True if the
        catalogue changed."""
        if event.op == "retire":
            changed = self.retire(event.item_id)
        else:
            with self._lock:
                self._retired.discard(event.item_id)
            changed = self.upsert(event.item_id, event.features)
        with self._lock:
            if seq > self._items_seq:
                self._items_seq = seq
                self._revision += 1  # a newer cut: the next build records it
        return changed

    def observe_event(self, event: Event) -> bool:
        """Take an impression's or click's item (requests carry none). True if it is new."""
        if event.item_id is None or event.item_id in self._retired:
            return False
        return self.upsert(event.item_id, event.item_features)

    def observe_record(self, record: Mapping[str, Any], where: str = "record") -> bool:
        """Take one catalogue record ``{"item_id": str, "item_features": {...}}``."""
        if not isinstance(record, Mapping):
            raise CatalogueError(f"{where}: a catalogue record must be a JSON object")
        item_id = record.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise CatalogueError(f"{where}: missing or empty 'item_id' (a string)")
        return self.upsert(item_id, _clean_features(record.get("item_features"), where))

    def load_jsonl(self, path: str | Path) -> int:
        """Read a catalogue file: one JSON record per line (blank lines skipped).

        The whole file is validated before anything is taken, so a bad line changes
        nothing. Returns the number of records read.
        """
        path = Path(path)
        records: list[tuple[Mapping[str, Any], str]] = []
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise CatalogueError(f"{where}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("item_id"), str):
                    raise CatalogueError(f"{where}: expected an object with a string 'item_id'")
                _clean_features(obj.get("item_features"), where)
                records.append((obj, where))
        for obj, where in records:
            self.observe_record(obj, where)
        return len(records)

    def extend(self, events: Iterable[Event]) -> int:
        """Observe many events; returns how many new items they brought."""
        return sum(self.observe_event(e) for e in events)

    def first_seen(self, item_id: str) -> float | None:
        """When the item was first seen (catalogue clock), or None if unknown."""
        return self._first_seen.get(item_id)

    def snapshot(self) -> CatalogueSnapshot:
        """The catalogue now, in insertion order. Cheap (two tuple copies under the lock);
        the examples are shared, never mutated: an update replaces an item's example."""
        with self._lock:
            return CatalogueSnapshot(ids=tuple(self._xs), xs=tuple(self._xs.values()), revision=self._revision,
                                     items_seq=self._items_seq)
