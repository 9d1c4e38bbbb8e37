"""The event consumer: poll, decode + validate, dead-letter the bad, hand over, commit.

:class:`EventConsumer` turns Kafka records into validated :class:`~streams.events.Event`
batches. Every record is decoded as :func:`~streams.events.decode_event` does (a batch
at a time, :func:`~streams.events.decode_events`); a record that fails goes to the
dead-letter topic with its reason (see :mod:`streams.deadletter`) and the consumer keeps
going. A batch is handed over only after its dead letters are
acknowledged, and :meth:`EventConsumer.run` commits the batch's offsets only after the
handler returned: a consumer that crashes anywhere resumes from the last commit and
loses nothing (at-least-once; the handler may see a batch again after a crash).

Duplicate delivery: the consumer remembers, per partition, the next offset it expects
(:meth:`EventConsumer.skip_below`); a record below it is skipped, not handed over again.
The learner runtime seeds it from its checkpoint so a replayed record is never learned
twice.

Use :func:`open_event_consumer` to build one from settings::

    ec = open_event_consumer(settings, "my-group", [topics.events], topics.dead_letter)
    ec.run(lambda batch: handle(batch.events), idle_timeout_s=5)
    ec.close()
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from streams.columns import EventColumns, decode_columns
from streams.deadletter import DeadLetterWriter
from streams.errors import EventValidationError
from streams.events import Event, decode_events
from streams.transport import (
    Consumer,
    KafkaSettings,
    Producer,
    RebalanceCallback,
    Record,
    TopicPartition,
    make_consumer,
    make_producer,
)

__all__ = ["EventBatch", "ColumnBatch", "EventConsumer", "ConsumerCounts", "IdleTimer", "open_event_consumer", "tune_gc"]

log = logging.getLogger(__name__)

#: How long past an idle timeout a consumer may wait for a partition assignment.
UNASSIGNED_GRACE_S = 60.0


@dataclass(frozen=True)
class EventBatch:
    """What one poll produced.

    Attributes
    ----------
    events, records
        The valid events, in consumption order, and the record each came from
        (``records[i]`` carried ``events[i]``).
    offsets
        Next offset per partition covering every new record of the batch, valid and
        dead-lettered (skipped duplicates never move an offset back). Commit these once
        the batch is handled.
    dead_lettered
        How many records of this batch went to the dead-letter topic.
    duplicates
        How many records were skipped as already handled (below :meth:`EventConsumer.skip_below`).
    """

    events: Sequence[Event]
    records: Sequence[Record]
    offsets: Mapping[TopicPartition, int]
    dead_lettered: int = 0
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.events)


@dataclass(frozen=True)
class ColumnBatch:
    """What one poll produced, as columns (:meth:`EventConsumer.poll_columns`).

    Attributes
    ----------
    columns
        The valid events (:class:`~streams.columns.EventColumns`), in consumption order.
    partitions, kafka_offsets
        (N,) int64: the partition and offset of the record each row came from.
    offsets, dead_lettered, duplicates
        As in :class:`EventBatch`.
    """

    columns: EventColumns
    partitions: np.ndarray
    kafka_offsets: np.ndarray
    offsets: Mapping[TopicPartition, int]
    dead_lettered: int = 0
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.columns)


@dataclass
class ConsumerCounts:
    """Running totals of one :class:`EventConsumer` (records = events + dead + duplicates)."""

    records: int = 0
    events: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    batches: int = 0
    commits: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class IdleTimer:
    """Idle-timeout bookkeeping for a consumer loop: time without a record *while
    partitions are assigned*. Waiting for an assignment (a group rebalancing after a
    crash waits for the dead member's session to expire) restarts the count, but only up
    to ``UNASSIGNED_GRACE_S`` past the timeout. ``timeout_s=None`` never expires.

    >>> t = [0.0]
    >>> idle = IdleTimer(2.0, clock=lambda: t[0])
    >>> t[0] = 5.0; idle.expired(assigned=False)   # rebalancing: not idle
    False
    >>> t[0] = 6.0; idle.expired(assigned=True), idle.expired(assigned=True)
    (False, False)
    >>> t[0] = 8.0; idle.expired(assigned=True)
    True
    """

    def __init__(self, timeout_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self._last = clock()
        self._unassigned_since: float | None = None

    def record(self) -> None:
        """A record arrived."""
        self._last = self.clock()
        self._unassigned_since = None

    def expired(self, assigned: bool) -> bool:
        """Whether the loop should stop now, after a poll that returned nothing."""
        if self.timeout_s is None:
            return False
        now = self.clock()
        if assigned:
            self._unassigned_since = None
            if now - self._last >= self.timeout_s:
                log.info("no record for %.1f s: stopping", now - self._last)
                return True
            return False
        if self._unassigned_since is None:
            self._unassigned_since = now
        self._last = now
        if now - self._unassigned_since >= self.timeout_s + UNASSIGNED_GRACE_S:
            log.warning("no partition assigned for %.1f s: stopping", now - self._unassigned_since)
            return True
        return False


class EventConsumer:
    """Decode + validate + dead-letter loop over a :class:`~streams.transport.Consumer`.

    Parameters
    ----------
    consumer
        A consumer from :func:`~streams.transport.make_consumer` (not yet subscribed:
        subscribe through :meth:`subscribe` so rebalances are tracked).
    dead_letters
        Where bad records go.
    batch_size
        Most records per batch (decoded events plus rejected records).
    poll_timeout_s
        How long one poll waits for records.
    """

    def __init__(self, consumer: Consumer, dead_letters: DeadLetterWriter, *, batch_size: int = 1000,
                 poll_timeout_s: float = 0.5, producer: Producer | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.counts = ConsumerCounts()
        self._producer = producer  # closed with the consumer when we built it
        self._floor: dict[TopicPartition, int] = {}
        self._buffer: list[Record] = []
        self._stop = threading.Event()

    # ------------------------------------------------------------------ group membership

    def subscribe(self, topics: Sequence[str], *, on_assigned: RebalanceCallback | None = None,
                  on_revoked: RebalanceCallback | None = None) -> None:
        """Join the group for ``topics``. ``on_revoked`` runs before partitions are given up
        (commit there); ``on_assigned`` may call :meth:`seek` to choose start offsets."""

        def revoked(partitions: list[TopicPartition]) -> None:
            if on_revoked is not None:
                on_revoked(partitions)
            self.forget(partitions)

        def assigned(partitions: list[TopicPartition]) -> None:
            self.forget(partitions)
            if on_assigned is not None:
                on_assigned(partitions)

        self.consumer.subscribe(topics, on_assigned=assigned, on_revoked=revoked)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop buffered records and the duplicate floor of ``partitions`` (they were
        revoked or are being re-positioned)."""
        gone = set(partitions)
        if not gone:
            return
        self._buffer = [r for r in self._buffer if (r.topic, r.partition) not in gone]
        for tp in gone:
            self._floor.pop(tp, None)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Continue ``partition`` at ``offset`` (drops what was buffered for it)."""
        self._buffer = [r for r in self._buffer if (r.topic, r.partition) != partition]
        self.consumer.seek(partition, offset)

    def skip_below(self, offsets: Mapping[TopicPartition, int]) -> None:
        """From now on skip records whose offset is below ``offsets[partition]``: they were
        handled already (a checkpoint holds them)."""
        for tp, off in offsets.items():
            tp = TopicPartition(*tp)
            if off > self._floor.get(tp, -1):
                self._floor[tp] = off

    # ------------------------------------------------------------------ the loop

    def _next_records(self, timeout_s: float | None) -> list[Record] | None:
        """Up to ``batch_size`` records: what a previous poll left over, else a new poll
        (``None`` when nothing arrived within the timeout); the rest is kept for next time."""
        limit = self.batch_size
        if self._buffer:
            records, self._buffer = self._buffer, []
        else:
            records = self.consumer.poll(limit, self.poll_timeout_s if timeout_s is None else timeout_s)
            if not records:
                return None
        if len(records) > limit:
            self._buffer, records = records[limit:] + self._buffer, records[:limit]
        return records

    def poll_batch(self, max_events: int | None = None, timeout_s: float | None = None) -> EventBatch | None:
        """Poll, decode and validate up to ``batch_size`` records (and at most
        ``max_events`` valid events). Dead letters of the batch are acknowledged before it
        is returned. ``None`` when nothing arrived within the timeout."""
        records = self._next_records(timeout_s)
        if records is None:
            return None
        want = len(records) if max_events is None else max_events
        events: list[Event] = []
        good: list[Record] = []
        offsets: dict[TopicPartition, int] = {}
        floor = self._floor
        dead = dups = 0
        taken = 0
        # handled before: the floor already covers their offsets (it moves only after the loop)
        dup = [bool(floor) and rec.offset < floor.get((rec.topic, rec.partition), -1) for rec in records]
        # decode the whole batch in one call unless max_events may stop it early
        if want >= len(records):
            decoded = iter(decode_events([rec.value for rec, d in zip(records, dup) if not d]))
        else:
            decoded = None
        for rec, is_dup in zip(records, dup):
            if len(events) >= want:
                break
            taken += 1
            if is_dup:
                dups += 1
                continue
            key = (rec.topic, rec.partition)
            offsets[key] = rec.offset + 1
            event = next(decoded) if decoded is not None else decode_events([rec.value])[0]
            if type(event) is not Event:
                if isinstance(event, EventValidationError):
                    self.dead_letters.write(rec, event.reason, str(event))
                else:  # a validator gap (ValueError, TypeError, OverflowError): keep the record
                    self.dead_letters.write(rec, "invalid", f"{type(event).__name__}: {event}")
                dead += 1
                continue
            events.append(event)
            good.append(rec)
        if taken < len(records):
            self._buffer = records[taken:] + self._buffer
        if dead:
            self.dead_letters.flush()
        tp_offsets = {TopicPartition(*k): v for k, v in offsets.items()}
        for tp, off in tp_offsets.items():
            if off > floor.get(tp, -1):
                floor[tp] = off
        c = self.counts
        c.records += taken
        c.events += len(events)
        c.dead_lettered += dead
        c.duplicates += dups
        c.batches += 1
        if dead:
            c.by_reason = dict(self.dead_letters.counts)
        return EventBatch(events, good, tp_offsets, dead, dups)

    def poll_columns(self, max_events: int | None = None, timeout_s: float | None = None) -> ColumnBatch | None:
        """:meth:`poll_batch` as columns: the whole poll decoded in one
        :func:`~streams.columns.decode_columns` pass, the same records dead-lettered with
        the same reasons, the same offsets, duplicates skipped alike. ``None`` when nothing
        arrived within the timeout."""
        records = self._next_records(timeout_s)
        if records is None:
            return None
        floor = self._floor
        fresh = [i for i, rec in enumerate(records)
                 if not floor or rec.offset >= floor.get((rec.topic, rec.partition), -1)]
        cols, rejects = decode_columns([records[i].value for i in fresh])
        taken = len(records)
        if max_events is not None and len(cols) > max_events:  # stop right after the last wanted event
            taken = fresh[int(cols.source[max_events - 1])] + 1 if max_events > 0 else 0
            cols = cols.take(slice(0, max_events))
            rejects = [(j, exc) for j, exc in rejects if fresh[j] < taken]
            self._buffer = records[taken:] + self._buffer
        for j, exc in rejects:
            rec = records[fresh[j]]
            if isinstance(exc, EventValidationError):
                self.dead_letters.write(rec, exc.reason, str(exc))
            else:  # a validator gap (ValueError, TypeError, OverflowError): keep the record
                self.dead_letters.write(rec, "invalid", f"{type(exc).__name__}: {exc}")
        if rejects:
            self.dead_letters.flush()
        kept = [records[i] for i in fresh if i < taken]
        offsets = {TopicPartition(rec.topic, rec.partition): rec.offset + 1 for rec in kept}
        for tp, off in offsets.items():
            if off > floor.get(tp, -1):
                floor[tp] = off
        good = [kept[j] for j in cols.source.tolist()]  # source indexes fresh, kept is its prefix
        c = self.counts
        c.records += taken
        c.events += len(cols)
        c.dead_lettered += len(rejects)
        c.duplicates += taken - len(kept)
        c.batches += 1
        if rejects:
            c.by_reason = dict(self.dead_letters.counts)
        return ColumnBatch(cols, np.array([r.partition for r in good], dtype=np.int64),
                           np.array([r.offset for r in good], dtype=np.int64), offsets, len(rejects),
                           taken - len(kept))

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit next offsets to the group (after the batch was handled)."""
        if offsets:
            self.consumer.commit(offsets)
            self.counts.commits += 1

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, handler: Callable[[EventBatch], None], *, max_events: int | None = None,
            idle_timeout_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> ConsumerCounts:
        """Handle batches until :meth:`stop`, ``max_events`` valid events, or
        ``idle_timeout_s`` without a record. Each batch: handler, then commit. An exception
        from the handler propagates and nothing of that batch is committed."""
        handled = 0
        idle = IdleTimer(idle_timeout_s, clock)
        while not self._stop.is_set():
            left = None if max_events is None else max_events - handled
            if left is not None and left <= 0:
                break
            batch = self.poll_batch(max_events=left)
            if batch is None:
                if idle.expired(bool(self.consumer.assignment())):
                    break
                continue
            idle.record()
            if batch.events:
                handler(batch)
            handled += len(batch.events)
            self.commit(batch.offsets)
        return self.counts

    def close(self) -> None:
        """Close the consumer (and the dead-letter producer when we built it)."""
        try:
            self.consumer.close()
        finally:
            if self._producer is not None:
                self._producer.close()


def open_event_consumer(
    settings: KafkaSettings,
    group_id: str,
    topics: Sequence[str],
    dead_letter_topic: str,
    *,
    batch_size: int = 1000,
    poll_timeout_s: float = 0.5,
    on_assigned: RebalanceCallback | None = None,
    on_revoked: RebalanceCallback | None = None,
    eager: bool = False,
) -> EventConsumer:
    """An :class:`EventConsumer` subscribed to ``topics`` in ``group_id``, with its own
    dead-letter producer. Close it with :meth:`EventConsumer.close`. ``eager``: see
    :func:`streams.transport.make_consumer` (True for latency-sensitive loops)."""
    producer = make_producer(settings)
    consumer = make_consumer(settings, group_id, max_poll_records=batch_size, eager=eager)
    writer = DeadLetterWriter(producer, dead_letter_topic, group_id)
    ec = EventConsumer(consumer, writer, batch_size=batch_size, poll_timeout_s=poll_timeout_s, producer=producer)
    ec.subscribe(topics, on_assigned=on_assigned, on_revoked=on_revoked)
    return ec


def tune_gc(gen0_threshold: int | None = 50_000, full_every: int | None = None) -> None:
    """Tune Python's cyclic garbage collector for a consumer *process*; call once, after
    start-up (the learner built, the checkpoint loaded).

    Decoding allocates several containers per event and a batch keeps them alive until it
    is handled, so with the default thresholds (700) the collector rescans the same young
    objects many times: it costs about a third of a confluent-kafka consumer's CPU. This
    freezes the objects built so far (they are never scanned again) and collects the
    young generation every ``gen0_threshold`` allocations instead. Events hold no
    reference cycles, so nothing is kept longer than a batch. Process-wide: library code
    never calls it; ``towerstream learn`` and the benchmarks do.

    ``gen0_threshold=None`` only freezes and keeps the thresholds: a latency-sensitive
    process (``towerstream serve``) wants frequent sub-millisecond young collections, not
    rare ones of tens of milliseconds, and no full collection rescanning its libraries.
    ``full_every`` sets the third threshold (young-generation collections of the second
    generation between full ones; Python's default 10), to make full collections rarer.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0 if gen0_threshold is None else gen0_threshold, gen1,
                     gen2 if full_every is None else full_every)
