"""Incremental index updates between full rebuilds: a small exact side index.

Between rebuilds the indexer applies item events (:mod:`streams.items`) to the served
version with the *same frozen item tower* that version was built with. The deltas live
in a small exact side index merged at query time, not in the base FAISS index:

* the base index stays exactly the published, checksummed artifact (an IVF index's
  lists and tuned ``nprobe`` are untouched, and nothing in FAISS is mutated under
  running queries);
* new items are found by exact search, so their recall is 1 whatever the base kind;
* a retired or changed item is hidden from the base answers by an id mask, and the
  base is asked for ``k + len(hidden)`` so a mask never shortens an answer.

The side index holds only the items changed since the base was built (hundreds to a
few thousand), so the extra exact scan costs microseconds against the base search.

Every applied batch gives a new immutable :class:`DeltaHandle` (build fully, swap one
reference). ``(version, delta_seq)`` names exactly what is served: the published base
plus the item log up to ``delta_seq``. A full rebuild or a rollback :meth:`DeltaLog.rebase`
onto the new base and replays the log entries the base does not cover, so a retired
item stays retired whatever base is served. A delta whose vector is not finite is
refused (counted, logged), never served.

>>> import faiss, numpy as np
>>> from indexer.handle import IndexHandle
>>> base = faiss.IndexFlatIP(2); base.add(np.eye(2, dtype="float32"))
>>> h = IndexHandle(base, np.array(["a", "b"]), 1, {})
>>> enc = lambda xs: np.array([[0.6, 0.8] for _ in xs], dtype="float32")
>>> log_ = DeltaLog(enc)
>>> from streams.items import ItemEvent
>>> d = log_.apply(log_.rebase(h), [ItemEvent("upsert", "c", 0.0), ItemEvent("retire", "b", 0.0)])
>>> r = d.search(np.array([[0.0, 1.0]], dtype="float32"), k=2)
>>> r.ids.tolist(), r.version, r.delta_seq
([['c', 'a']], 1, 2)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from indexer.catalogue import item_x
from indexer.handle import IndexHandle, SearchResult
from streams.items import ItemEvent

__all__ = ["DeltaHandle", "DeltaLog", "ItemEncoder"]

log = logging.getLogger(__name__)

ItemEncoder = Callable[[Sequence[dict]], np.ndarray]
"""``encode_items`` of the frozen model the base version was built with: (N,) xs -> (N, D)."""


@dataclass(frozen=True, eq=False)
class DeltaHandle:
    """A published base version plus the item deltas applied to it since; immutable.

    Attributes
    ----------
    base
        The published :class:`IndexHandle`.
    delta_seq
        Sequence number of the last item event reflected (0: none).
    side_ids, side_vecs
        Items added or changed since the base, shape (M,) and (M, D), exact search.
    hidden
        Ids whose base vectors must not be served (retired or replaced by a side vector).
    encode_items
        The frozen item tower the base was built with; deltas on this handle are embedded
        with it (None: the :class:`DeltaLog`'s default encoder).
    """

    base: IndexHandle
    delta_seq: int = 0
    side_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U1"))
    side_vecs: np.ndarray | None = None
    hidden: frozenset[str] = frozenset()
    encode_items: "ItemEncoder | None" = None  # the base's frozen item tower (None: the log's)
    _hidden_arr: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U1"))
    _hidden_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __repr__(self) -> str:
        return (f"DeltaHandle(version={self.version}, delta_seq={self.delta_seq}, base_items={self.base.size}, "
                f"side_items={len(self.side_ids)}, hidden={len(self.hidden)})")

    @property
    def version(self) -> int:
        """The base version number."""
        return self.base.version

    @property
    def manifest(self) -> dict:
        """The base version's manifest (``published_at``: the index age gauges)."""
        return self.base.manifest

    @property
    def path(self):
        """The base version's directory."""
        return self.base.path

    @property
    def size(self) -> int:
        """Items served: base items not hidden plus side items."""
        return self.base.size - len(self._hidden_labels) + len(self.side_ids)

    @property
    def dim(self) -> int:
        """Vector dimension D."""
        return self.base.dim

    def search(self, user_vecs: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` over base (minus hidden ids) and side items, best first."""
        queries = np.ascontiguousarray(np.atleast_2d(user_vecs), dtype=np.float32)
        if not self.hidden and not len(self.side_ids):
            r = self.base.search(queries, k)
            return SearchResult(ids=r.ids, scores=r.scores, version=r.version, delta_seq=self.delta_seq)
        if queries.shape[1] != self.dim:
            raise ValueError(f"user vectors have dimension {queries.shape[1]}, the index {self.dim}")
        fetch = min(k + len(self._hidden_labels), max(self.base.size, 1))
        scores, labels = self.base.index.search(queries, fetch)
        drop = labels < 0
        if len(self._hidden_labels):
            drop |= np.isin(labels, self._hidden_labels)  # int labels: cheap
        scores = np.where(drop, -np.inf, scores).astype(np.float32)
        if len(self.side_ids):
            scores = np.concatenate([scores, queries @ self.side_vecs.T], axis=1)  # side: exact
        k_eff = min(k, scores.shape[1])
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        order = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1,
                                                    kind="stable"), axis=1)
        top_scores = np.take_along_axis(scores, order, axis=1)
        from_base = order < fetch
        base_lab = np.take_along_axis(labels, np.minimum(order, fetch - 1), axis=1)
        base_ids = self.base.ids[np.where(from_base, np.maximum(base_lab, 0), 0)] if self.base.size else None
        side_pos = np.clip(order - fetch, 0, max(len(self.side_ids) - 1, 0))
        side_ids = self.side_ids[side_pos] if len(self.side_ids) else None
        if base_ids is None:
            top_ids = side_ids
        elif side_ids is None:
            top_ids = base_ids
        else:
            top_ids = np.where(from_base, base_ids, side_ids)
        top_ids = np.where(np.isfinite(top_scores), top_ids, "")
        if k_eff < k:  # fewer candidates than k
            pad = k - k_eff
            top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values="")
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return SearchResult(ids=top_ids, scores=top_scores.astype(np.float32), version=self.version,
                            delta_seq=self.delta_seq)


@dataclass(frozen=True)
class _Entry:
    seq: int
    event: ItemEvent


class DeltaLog:
    """The ordered item log and the function that applies it to a base version.

    Parameters
    ----------
    encode_items
        The default frozen item tower (a handle's own ``encode_items``, given to
        :meth:`rebase`, wins): None when every base brings its own.
    clock
        Wall clock (seconds since the epoch) for the freshness samples.
    on_fresh
        Called with ``(item_id, seconds)`` from an upsert's event time to the moment its
        delta handle was built (the first retrievable moment once swapped in).
    on_refused
        Called once for each refused delta (e.g. :meth:`FreshnessMetrics.refused`).

    Attributes
    ----------
    refused_total
        Deltas refused because their vector was not finite.
    freshness_s
        Event time -> retrievable, one sample per applied upsert.
    """

    def __init__(self, encode_items: ItemEncoder | None = None, *, clock: Callable[[], float] = time.time,
                 on_fresh: Callable[[str, float], None] | None = None,
                 on_refused: Callable[[], None] | None = None) -> None:
        self.encode_items = encode_items
        self._clock = clock
        self._on_fresh = on_fresh
        self._on_refused = on_refused
        self._entries: list[_Entry] = []
        self.seq = 0
        self.refused_total = 0
        self.refusals: list[str] = []
        self.freshness_s: list[float] = []
        self._recorded_seq = 0  # events up to here had their freshness / refusal recorded

    def rebase(self, base: IndexHandle, *, covered_seq: int | None = None,
               encode_items: ItemEncoder | None = None) -> DeltaHandle:
        """A handle over ``base`` with every logged event after ``covered_seq`` replayed.

        A full rebuild passes the log sequence its catalogue cut covered (so nothing is
        applied twice and nothing lost); a rollback passes the older version's value, or
        None (replay the whole log: retirements hold on any base). ``encode_items`` is the
        base's own frozen item tower (None: this log's default).
        """
        after = 0 if covered_seq is None else covered_seq
        handle = DeltaHandle(base=base, delta_seq=max(after, 0), encode_items=encode_items)
        self._record_covered(base, after)
        todo = [e for e in self._entries if e.seq > after]
        return self._build(handle, todo, record=True) if todo else handle

    def _record_covered(self, base: IndexHandle, covered: int) -> None:
        """Upserts the new base covers that no delta served yet (they arrived before this
        process could apply them, e.g. before the first version): they become retrievable
        now, with the base, and are counted so, not left out of the freshness samples."""
        fresh = [e.event for e in self._entries
                 if self._recorded_seq < e.seq <= covered and e.event.op == "upsert"]
        if not fresh:
            return
        rows, now = base.rows, self._clock()
        for ev in fresh:
            if ev.item_id in rows:
                self.freshness_s.append(now - ev.event_time)
                if self._on_fresh is not None:
                    self._on_fresh(ev.item_id, now - ev.event_time)
        self._recorded_seq = max(self._recorded_seq, covered)

    def append(self, events: Sequence[ItemEvent], seqs: Sequence[int] | None = None) -> int:
        """Log ``events``; returns the last sequence number.

        ``seqs`` gives each event's sequence (the items topic's offset + 1, so that every
        process names the same event by the same number); without it events are numbered
        on from the last. A sequence at or below the last is a duplicate and skipped.
        """
        if seqs is not None and len(seqs) != len(events):
            raise ValueError(f"{len(events)} events but {len(seqs)} sequence numbers")
        for i, event in enumerate(events):
            seq = self.seq + 1 if seqs is None else int(seqs[i])
            if seq <= self.seq:
                continue  # re-delivered: already logged
            self.seq = seq
            self._entries.append(_Entry(seq, event))
        return self.seq

    @property
    def first_seq(self) -> int:
        """The oldest sequence still held (0: the log is empty)."""
        return self._entries[0].seq if self._entries else 0

    def __len__(self) -> int:
        return len(self._entries)

    def trim(self, upto_seq: int) -> int:
        """Forget entries at or below ``upto_seq`` (every base that may still be served
        covers them); returns how many were dropped."""
        keep = [e for e in self._entries if e.seq > upto_seq]
        dropped = len(self._entries) - len(keep)
        self._entries = keep
        return dropped

    def catch_up(self, handle: DeltaHandle) -> DeltaHandle:
        """A new handle with every logged event after ``handle.delta_seq`` applied.

        Freshness samples and refusals are recorded once per event, however many
        handles it is built into.
        """
        todo = [e for e in self._entries if e.seq > handle.delta_seq]
        return self._build(handle, todo, record=True) if todo else handle

    def apply(self, handle: DeltaHandle, events: Sequence[ItemEvent]) -> DeltaHandle:
        """Log ``events`` and return a new handle with them applied; ``handle`` is untouched."""
        self.append(events)
        return self.catch_up(handle)

    def _build(self, handle: DeltaHandle, entries: Sequence[_Entry], *, record: bool) -> DeltaHandle:
        latest: dict[str, ItemEvent] = {}
        for e in entries:
            latest.pop(e.event.item_id, None)
            latest[e.event.item_id] = e.event  # newest wins, order kept
        seq_of = {e.event.item_id: e.seq for e in entries}
        upserts = [ev for ev in latest.values() if ev.op == "upsert"]
        encoder = handle.encode_items if handle.encode_items is not None else self.encode_items
        if encoder is None and upserts:
            log.warning("version %s has no frozen item tower: %d upsert(s) wait for the next build "
                        "(retirements still apply)", handle.version, len(upserts))
            upserts = []
        vecs = (np.asarray(encoder([item_x(ev.item_id, ev.features) for ev in upserts]),
                           dtype=np.float32) if upserts else np.zeros((0, handle.dim), dtype=np.float32))
        finite = np.isfinite(vecs).all(axis=1) if len(vecs) else np.zeros(0, dtype=bool)
        side = {sid: v for sid, v in zip(handle.side_ids.tolist(),
                                         handle.side_vecs if handle.side_vecs is not None else [])}
        hidden = set(handle.hidden)
        now = self._clock()
        fresh: list[tuple[str, float]] = []
        for ev in latest.values():
            if ev.op == "retire":
                side.pop(ev.item_id, None)
                hidden.add(ev.item_id)
        for ev, v, ok in zip(upserts, vecs, finite):
            first = record and seq_of[ev.item_id] > self._recorded_seq
            if not ok:
                reason = f"item {ev.item_id}: delta vector is not finite (NaN/inf); refused, not served"
                if first:
                    self.refused_total += 1
                    self.refusals.append(reason)
                    log.warning("delta refused: %s", reason)
                    if self._on_refused is not None:
                        self._on_refused()
                continue
            side[ev.item_id] = v
            hidden.add(ev.item_id)  # a base vector of the same id is superseded
            if first:
                fresh.append((ev.item_id, now - ev.event_time))
        side_ids = np.array(list(side), dtype=str) if side else np.zeros(0, dtype="<U1")
        side_vecs = np.ascontiguousarray(np.stack(list(side.values())), dtype=np.float32) if side else None
        if side_vecs is not None and side_vecs.shape[1] != handle.dim:
            raise ValueError(f"delta vectors have dimension {side_vecs.shape[1]}, the index {handle.dim}")
        seq = max([handle.delta_seq, *(e.seq for e in entries)])
        hidden_arr = np.array(sorted(hidden), dtype=str)
        rows = handle.base.rows  # built once per base
        labels = np.array(sorted(rows[i] for i in hidden if i in rows), dtype=np.int64)  # O(hidden), not O(N)
        out = DeltaHandle(base=handle.base, delta_seq=seq, side_ids=side_ids, side_vecs=side_vecs,
                          hidden=frozenset(hidden), encode_items=handle.encode_items,
                          _hidden_arr=hidden_arr, _hidden_labels=labels)
        if record:
            self._recorded_seq = max(self._recorded_seq, seq)
            for item_id, seconds in fresh:
                self.freshness_s.append(seconds)
                if self._on_fresh is not None:
                    self._on_fresh(item_id, seconds)
        return out
