"""Apply item events from ``<prefix>.items`` to the served index between rebuilds.

:class:`ItemDeltaFollower` turns polled item records into delta handles
(:mod:`indexer.delta`) and swaps them into an :class:`~indexer.handle.IndexHolder` by
compare-and-swap, so a version the watcher swapped in meanwhile is never overwritten.
When the served base changed (a rebuild or a rollback), the item log is replayed onto
it first: a retired item stays retired on any base. Records that fail to decode go to
the dead-letter topic with the reason and the follower keeps going.
"""

from __future__ import annotations

import logging
from typing import Sequence

from indexer.delta import DeltaHandle, DeltaLog
from indexer.handle import IndexHolder
from streams.deadletter import DeadLetterWriter
from streams.items import ItemEvent, ItemEventError, decode_item_event
from streams.transport import Consumer, Record

__all__ = ["ItemDeltaFollower"]

log = logging.getLogger(__name__)


class ItemDeltaFollower:
    """Decode item records, apply them as deltas, swap the holder's handle.

    Parameters
    ----------
    holder
        The scorer's (or indexer's) served holder.
    deltas
        The item log, with the frozen item tower of the served version.
    dead_letters
        Where undecodable records go (with the reason).
    """

    def __init__(self, holder: IndexHolder, deltas: DeltaLog, dead_letters: DeadLetterWriter) -> None:
        self.holder = holder
        self.deltas = deltas
        self.dead_letters = dead_letters
        self.applied = 0

    def _current(self) -> tuple[object, DeltaHandle | None]:
        served = self.holder.current
        if served is None:
            return served, None
        if isinstance(served, DeltaHandle):
            return served, served
        return served, self.deltas.rebase(served)  # a new base: replay the log on it

    def handle_records(self, records: Sequence[Record]) -> int:
        """Apply one poll's records; returns the number of item events applied."""
        events: list[ItemEvent] = []
        for rec in records:
            try:
                events.append(decode_item_event(rec.value))
            except ItemEventError as exc:
                self.dead_letters.write(rec, "invalid_item_event", str(exc))
        if self.dead_letters.total:
            self.dead_letters.flush()
        self.deltas.append(events)
        for _ in range(3):  # the watcher may swap a version in between: retry on it
            served, base = self._current()
            if base is None:
                log.warning("item events before any index version: %d kept in the log", len(events))
                return 0
            if self.holder.swap_if(served, self.deltas.catch_up(base)):
                self.applied += len(events)
                return len(events)
        raise RuntimeError("the served index kept changing while applying item deltas")

    def poll_once(self, consumer: Consumer, timeout_s: float = 0.2) -> int:
        """Poll ``consumer`` once and apply what came."""
        return self.handle_records(consumer.poll(timeout_s=timeout_s))
