"""Apply item events from ``<prefix>.items`` to the served index between rebuilds.

:class:`ItemDeltaFollower` turns polled item records into delta handles
(:mod:`indexer.delta`) and swaps them into an :class:`~indexer.handle.IndexHolder` by
compare-and-swap, so a version the watcher swapped in meanwhile is never overwritten.
Each record's sequence is its items-topic offset + 1, so the scorer, the indexer and
every manifest name an item event by the same number.

When the served base changes (a rebuild or a rollback) the watcher hands it to
:meth:`ItemDeltaFollower.swap_base`, which embeds the log entries that version does not
cover (``manifest["items"]["covered_seq"]``) with *that version's* frozen item tower
(``tower.ckpt`` in its directory, :func:`version_tower`) and swaps the result in, under
the same lock as the delta path: a retired item stays retired on any base, and no plain
base is ever served while deltas it lacks exist. Records that fail to decode go to the
dead-letter topic with the reason and the follower keeps going.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from indexer.artifacts import TOWER_FILE, verify_file
from indexer.delta import DeltaHandle, DeltaLog, ItemEncoder
from indexer.handle import IndexHandle, IndexHolder
from streams.deadletter import DeadLetterWriter
from streams.errors import ConfigError, TowerstreamError
from streams.items import ItemEvent, ItemEventError, decode_item_event
from streams.topics import ITEMS_PARTITIONS, Topics
from streams.transport import Consumer, Record, TopicPartition

__all__ = ["ItemDeltaFollower", "VersionLearner", "version_learner", "version_tower", "covered_seq", "items_partition"]

log = logging.getLogger(__name__)


def items_partition(consumer: Consumer, topics: Topics) -> TopicPartition:
    """The items topic's one partition (its offset + 1 is the delta sequence), for the
    indexer's catalogue and the scorer's follower alike; a ConfigError names any other
    partition count."""
    parts = consumer.partitions_for(topics.items) or []
    if len(parts) != ITEMS_PARTITIONS:
        raise ConfigError(f"the items topic {topics.items!r} has {len(parts)} partitions; item deltas need exactly "
                          f"{ITEMS_PARTITIONS} (its offset is the delta sequence): recreate it with one partition "
                          "(a scorer can also run with --no-item-deltas)")
    return TopicPartition(topics.items, 0)


def covered_seq(base: Any) -> int | None:
    """The item-log sequence a version's build covered (None: the manifest does not say,
    e.g. a version built before item deltas: replay the whole log)."""
    manifest = getattr(base, "manifest", None) or {}
    value = (manifest.get("items") or {}).get("covered_seq")
    return int(value) if value is not None else None


@dataclass(frozen=True, eq=False)
class VersionLearner:
    """The learner a version's ``tower.ckpt`` rebuilds, with what its checkpoint says."""

    learner: Any
    name: str
    events_learned: int
    created_at: float
    path: Path
    sha256: str


_TOWERS: OrderedDict[str, VersionLearner] = OrderedDict()  # sha256 -> loaded, newest last
_TOWERS_LOCK = threading.Lock()
TOWER_CACHE_SIZE = 2


def version_learner(base: Any) -> VersionLearner | None:
    """The learner of the version ``base`` was built with (its ``tower.ckpt``), or None if the
    version keeps none; checked against the manifest's sha256 first.

    Loaded once per process for each distinct file (the newest :data:`TOWER_CACHE_SIZE`
    are kept): the scorer's model of a version (``serve --model-from index``) and the item
    tower that embeds its item deltas are one object, so an index swap costs one unpickle
    and one rebuild (tens of milliseconds of CPU, holding the GIL in long stretches, that
    every request in flight waits for), not two. A caller asking while another loads the
    same file waits for that load."""
    from learners.checkpoint import checkpoint_from_bytes

    path = getattr(base, "path", None)
    expected = ((getattr(base, "manifest", None) or {}).get("files") or {}).get(TOWER_FILE)
    if path is None or expected is None:
        return None
    sha = str(expected.get("sha256"))
    file = Path(path) / TOWER_FILE
    with _TOWERS_LOCK:
        hit = _TOWERS.get(sha)
        if hit is not None:  # the same bytes, already checked and loaded (maybe from another version's copy)
            _TOWERS.move_to_end(sha)
            return hit if hit.path == file else replace(hit, path=file)
        verify_file(file, expected)
        ckpt = checkpoint_from_bytes(file.read_bytes(), str(file))
        loaded = VersionLearner(learner=ckpt.learner(), name=str(ckpt.spec["name"]),
                                events_learned=int(ckpt.events_learned), created_at=float(ckpt.created_at),
                                path=file, sha256=sha)
        _TOWERS[sha] = loaded
        while len(_TOWERS) > TOWER_CACHE_SIZE:
            _TOWERS.popitem(last=False)
        return loaded


def version_tower(base: IndexHandle) -> ItemEncoder | None:
    """The frozen item tower a version was built with (:func:`version_learner`'s
    ``encode_items``), or None if the version keeps none."""
    loaded = version_learner(base)
    return None if loaded is None else loaded.learner.encode_items


class ItemDeltaFollower:
    """Decode item records, apply them as deltas, swap the holder's handle.

    Parameters
    ----------
    holder
        The scorer's (or indexer's) served holder.
    deltas
        The item log.
    dead_letters
        Where undecodable records go (with the reason).
    tower_for
        A new base -> its frozen item tower (default :func:`version_tower`; None from it:
        the log's default encoder, if any, else upserts wait for a build).
    on_upsert
        Called with ``(item_id, features)`` for every applied upsert (e.g. the scorer's
        item feature store, so pre-ranking sees the new item's features).
    on_served
        Called with the served ``delta_seq`` after every swap (a metrics gauge).
    min_covered
        Returns the smallest ``covered_seq`` of the versions a rollback could serve; the
        log is trimmed below it after each new base (None: never trimmed).
    """

    def __init__(self, holder: IndexHolder, deltas: DeltaLog, dead_letters: DeadLetterWriter, *,
                 tower_for: Callable[[IndexHandle], ItemEncoder | None] = version_tower,
                 on_upsert: Callable[[str, Mapping[str, Any]], None] | None = None,
                 on_served: Callable[[int], None] | None = None,
                 min_covered: Callable[[], int | None] | None = None) -> None:
        self.holder = holder
        self.deltas = deltas
        self.dead_letters = dead_letters
        self.tower_for = tower_for
        self.on_upsert = on_upsert
        self.on_served = on_served
        self.min_covered = min_covered
        self.applied = 0
        self.bases = 0
        self._lock = threading.Lock()  # one of: a delta batch, a new base

    # ------------------------------------------------------------------ a new base
    def _prepare(self, base: IndexHandle) -> DeltaHandle:
        try:
            encoder = self.tower_for(base)
        except (TowerstreamError, OSError) as exc:  # retirements still apply; upserts wait for a build
            log.error("could not load the item tower of index version %s: %s", base.version, exc)
            encoder = None
        if encoder is None and self.deltas.encode_items is None:
            log.warning("index version %s keeps no item tower (%s): item upserts wait for the next build",
                        base.version, TOWER_FILE)
        covered = covered_seq(base)
        if covered is not None and covered < self.deltas.first_seq - 1:
            log.warning("version %s covers the item log to %d but the log now starts at %d: the events "
                        "between were trimmed and are not replayed", base.version, covered, self.deltas.first_seq)
        return self.deltas.rebase(base, covered_seq=covered, encode_items=encoder)

    def swap_base(self, base: IndexHandle) -> DeltaHandle:
        """Serve ``base`` (a rebuild or a rollback) with the log entries it does not cover
        applied (the watcher's swap); returns the handle served."""
        with self._lock:
            handle = self._prepare(base)
            self.holder.swap(handle)
            self.bases += 1
            if self.min_covered is not None:
                floor = self.min_covered()
                if floor is not None:
                    self.deltas.trim(floor)
        if self.on_served is not None:
            self.on_served(handle.delta_seq)
        return handle

    # ------------------------------------------------------------------ deltas
    def _current(self) -> tuple[object, DeltaHandle | None]:
        served = self.holder.current
        if served is None:
            return served, None
        if isinstance(served, DeltaHandle):
            return served, served
        return served, self._prepare(served)  # swapped in without swap_base: replay the log on it

    def handle_records(self, records: Sequence[Record]) -> int:
        """Apply one poll's records; returns the number of item events applied."""
        events: list[ItemEvent] = []
        seqs: list[int] = []
        for rec in records:
            try:
                events.append(decode_item_event(rec.value))
                seqs.append(rec.offset + 1)
            except ItemEventError as exc:
                self.dead_letters.write(rec, "invalid_item_event", str(exc))
        if self.dead_letters.total:
            self.dead_letters.flush()
        if self.on_upsert is not None:  # features first: pre-ranking must know an item once it is retrievable
            for ev in events:
                if ev.op == "upsert":
                    self.on_upsert(ev.item_id, ev.features)
        with self._lock:
            self.deltas.append(events, seqs)
            for _ in range(3):  # a plain swap may happen in between: retry on it
                served, base = self._current()
                if base is None:
                    if events:
                        log.warning("item events before any index version: %d kept in the log", len(events))
                    return 0
                handle = self.deltas.catch_up(base)
                if handle is served or self.holder.swap_if(served, handle):
                    break
            else:
                raise RuntimeError("the served index kept changing while applying item deltas")
        self.applied += len(events)
        if events and self.on_served is not None:
            self.on_served(handle.delta_seq)
        return len(events)

    def poll_once(self, consumer: Consumer, timeout_s: float = 0.2) -> int:
        """Poll ``consumer`` once and apply what came."""
        return self.handle_records(consumer.poll(timeout_s=timeout_s))
