"""The stream runtime: Kafka events -> predict (metric) -> learn -> checkpoint -> commit.

:class:`StreamLearnerRuntime` feeds one learner from ``Topics.events`` in its own
consumer group:

1. poll a micro-batch; decode + validate every record (bad ones go to the dead-letter
   topic, see :mod:`streams.consumer`);
2. keep the impressions (clicks and requests are not training examples: they are
   skipped, their offsets still advance);
3. **predict first, then learn** (prequential evaluation): the metrics see each
   prediction made before the model learned from that event;
4. every ``checkpoint_every_n`` events or ``checkpoint_every_s`` seconds, write a
   checkpoint (state + offsets, atomically), *then* commit the same offsets.

Exactly-once learning across crashes. The checkpoint, not the group's committed offsets,
is the source of truth: on start, and whenever partitions are assigned, every partition
the checkpoint knows is sought to the checkpoint's offset, and records below that offset
(a duplicate delivery) are skipped. A process killed anywhere restarts from its last
checkpoint, re-learns exactly what came after it, and never learns an event twice.

Rebalances. Before partitions are revoked the runtime checkpoints and commits. Several
learners can read the same topic: give each its own group. One learner scaled over
several processes *in one group* splits the partitions: each process then holds a model
of its own partitions only (its checkpoint holds offsets of those partitions), not one
shared model; partitions a process takes over start at the group's committed offset.
Run one process per learner unless that split is what you want.

Stop with :meth:`StreamLearnerRuntime.stop` (or SIGTERM/SIGINT after
:meth:`~StreamLearnerRuntime.install_signal_handlers`): the batch in hand is finished,
then checkpoint, commit, close.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from learners.base import ColumnExamples
from learners.evaluate import prequential_step
from learners.checkpoint import (Checkpoint, flat_offsets, load_checkpoint, nest_offsets, same_learner,
                                 save_checkpoint)
from streams.columns import EventColumns
from streams.consumer import ConsumerCounts, EventConsumer, IdleTimer
from streams.deadletter import DeadLetterWriter
from streams.errors import ConfigError, StreamsError
from streams.shutdown import STOP_DEADLINE_S, exit_if_still_stopping
from streams.topics import Topics
from streams.transport import (
    Consumer,
    KafkaSettings,
    Producer,
    TopicPartition,
    make_consumer,
    make_producer,
)

__all__ = ["StreamLearnerRuntime", "RuntimeStats", "metrics_summary"]

log = logging.getLogger(__name__)

_METRIC_NAMES = ("n", "auc", "logloss", "rolling_auc", "rolling_logloss")


def metrics_summary(metrics: Any) -> dict[str, float | int | None]:
    """The prequential metrics as a plain dict (``None`` where not defined yet): the
    metrics object's ``snapshot()`` when it has one, else its attributes."""
    if metrics is None:
        return {}
    snapshot = getattr(metrics, "snapshot", None)
    raw: Mapping[str, Any] = snapshot() if callable(snapshot) else {
        name: getattr(metrics, name, None) for name in _METRIC_NAMES
    }
    out: dict[str, float | int | None] = {}
    for name, value in raw.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            continue
        if isinstance(value, (int, np.integer)):
            out[name] = int(value)
        else:
            out[name] = None if value != value else float(value)  # NaN: undefined so far
    return out


@dataclass(frozen=True)
class RuntimeStats:
    """A snapshot of one runtime.

    Attributes
    ----------
    events_learned
        Impressions folded into the model since it was created (checkpoints included).
    events_learned_run
        Impressions learned by this process.
    events_per_s
        Learn rate over the last stats interval; ``events_per_s_run`` over the whole run.
    records, skipped, dead_lettered, duplicates
        Records consumed by this process; of them, valid non-impressions (skipped), bad
        ones (dead-lettered) and already-learned ones (duplicates).
    lag
        End offset minus learned position per assigned partition; ``total_lag`` sums it
        (``None`` before it was first measured).
    last_checkpoint_at
        Wall time of the last checkpoint written (``None``: none yet).
    metrics
        Prequential metrics of the learner (``n``, ``auc``, ``logloss``, ``rolling_auc``,
        ``rolling_logloss``).
    """

    group_id: str
    learner: str
    events_learned: int
    events_learned_run: int
    events_per_s: float
    events_per_s_run: float
    records: int
    skipped: int
    dead_lettered: int
    duplicates: int
    lag: Mapping[TopicPartition, int]
    total_lag: int | None
    checkpoints: int
    last_checkpoint_at: float | None
    elapsed_s: float
    metrics: Mapping[str, float | int | None] = field(default_factory=dict)


class StreamLearnerRuntime:
    """Feed one learner from Kafka, prequentially, with checkpoints that carry offsets.

    Parameters
    ----------
    settings
        Kafka cluster and client.
    learner
        A learner (see :class:`learners.base.Learner`) with ``.spec``. If
        ``checkpoint_path`` exists, its state is loaded into this learner (the spec must
        match: same name and params).
    group_id
        Consumer group of this learner (one group per learner).
    topics
        Topic names: reads ``topics.events``, dead-letters to ``topics.dead_letter``.
    checkpoint_path
        Where checkpoints go; ``None`` for no checkpoints (then offsets are committed
        after every batch and a restart starts from them, with a fresh model).
    checkpoint_every_s, checkpoint_every_n
        Checkpoint when this much time passed or this many events were learned since the
        last one (whichever comes first; ``None`` disables that trigger).
    batch_size
        Most records per micro-batch.
    metrics
        Prequential metrics with ``update(y_true, p)``; default
        :class:`learners.metrics.PrequentialMetrics`.
    clock
        Monotonic seconds, for rates and checkpoint intervals.
    wall_clock
        Seconds since the epoch, for checkpoint times.
    max_events, idle_timeout_s
        Stop after learning this many events in this run / after this long without a
        record (tests and the demo).
    consumer_factory, producer
        Dependency injection for tests: ``consumer_factory(settings, group_id,
        max_poll_records)`` returns a :class:`~streams.transport.Consumer`; ``producer``
        sends dead letters.
    stats_every_s
        How often lag is measured and ``on_progress(stats)`` is called.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        learner: Any,
        group_id: str,
        topics: Topics = Topics(),
        checkpoint_path: str | Path | None = None,
        *,
        checkpoint_every_s: float | None = 30.0,
        checkpoint_every_n: int | None = None,
        batch_size: int = 1000,
        poll_timeout_s: float = 0.5,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_events: int | None = None,
        idle_timeout_s: float | None = None,
        consumer_factory: Callable[[KafkaSettings, str, int], Consumer] | None = None,
        producer: Producer | None = None,
        stats_every_s: float = 2.0,
        on_progress: Callable[[RuntimeStats], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if checkpoint_every_n is not None and checkpoint_every_n < 1:
            raise ConfigError(f"checkpoint every N events needs N >= 1, got {checkpoint_every_n}")
        if checkpoint_every_s is not None and checkpoint_every_s < 0:
            raise ConfigError(f"checkpoint interval must be >= 0 seconds, got {checkpoint_every_s}")
        if checkpoint_path is not None and not isinstance(getattr(learner, "spec", None), Mapping):
            raise ConfigError(
                f"{type(learner).__name__} has no .spec, so a checkpoint could not rebuild it: build it "
                "with learners.registry.make_learner, or run without a checkpoint"
            )
        self.settings = settings
        self.learner = learner
        self.group_id = group_id
        self.topics = topics
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpoint_every_n = checkpoint_every_n
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        if metrics is None:
            from learners.metrics import PrequentialMetrics

            metrics = PrequentialMetrics()
        self.metrics = metrics
        self._metrics_lock = threading.Lock()
        self.clock = clock
        self.wall_clock = wall_clock
        self.max_events = max_events
        self.idle_timeout_s = idle_timeout_s
        self.consumer_factory = consumer_factory or (
            lambda s, g, n: make_consumer(s, g, max_poll_records=n)
        )
        self.producer = producer
        self.stats_every_s = stats_every_s
        self.on_progress = on_progress

        self._offsets: dict[TopicPartition, int] = {}  # next offset learned, per partition
        self._events_learned = 0
        self._learned_run = 0
        self._skipped = 0
        self._dirty = False  # learned offsets moved since the last checkpoint/commit
        self._failed = False  # a batch failed half-way: never checkpoint that state
        self._learned_at_checkpoint = 0
        self._last_checkpoint_clock = clock()
        self._last_checkpoint_wall: float | None = None
        self._checkpoints = 0
        self._lag: dict[TopicPartition, int] = {}
        self._lag_measured = False
        self._check_ends: dict[TopicPartition, int] = {}
        self._counts = ConsumerCounts()
        self._started = clock()
        self._rate = 0.0
        self._rate_mark = (self._started, 0)
        self._stop = threading.Event()
        self._ec: EventConsumer | None = None
        self._own_producer = False
        self.resumed_from: Checkpoint | None = None
        self._load_checkpoint()

    # ------------------------------------------------------------------ checkpoints

    def _load_checkpoint(self) -> None:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return
        ck = load_checkpoint(self.checkpoint_path)
        spec = self.learner.spec
        want = {"name": spec["name"], "params": dict(spec.get("params", {}))}
        have = {"name": ck.spec["name"], "params": dict(ck.spec.get("params", {}))}
        if not same_learner(have, want):
            raise ConfigError(
                f"checkpoint {self.checkpoint_path} holds learner {have}, not {want}: use the same learner "
                "and params, or another checkpoint path"
            )
        self.learner.load_state_dict(ck.state)
        self._offsets = {TopicPartition(t, p): off for (t, p), off in flat_offsets(ck.offsets).items()}
        self._events_learned = self._learned_at_checkpoint = ck.events_learned
        self._last_checkpoint_wall = ck.created_at
        self.resumed_from = ck
        log.info("resumed %s from %s: %d events learned, offsets %s", want["name"], self.checkpoint_path,
                 ck.events_learned, ck.offsets)

    def _checkpoint_and_commit(self, why: str, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Checkpoint (if configured) then commit the learned offsets. No-op when nothing
        moved since the last one, or after a failed batch."""
        if self._failed or not self._dirty or self._ec is None:
            return
        offsets = dict(self._offsets)
        if self.checkpoint_path is not None:
            save_checkpoint(
                self.checkpoint_path, self.learner, nest_offsets(offsets), self._events_learned,
                extra={"group_id": self.group_id, "metrics": metrics_summary(self.metrics), "reason": why},
                clock=self.wall_clock,
            )
            self._checkpoints += 1
            self._last_checkpoint_wall = self.wall_clock()
            log.debug("checkpoint (%s): %d events, offsets %s", why, self._events_learned, offsets)
        self._learned_at_checkpoint = self._events_learned
        self._last_checkpoint_clock = self.clock()
        self._dirty = False
        owned = set(self._ec.consumer.assignment()) | set(partitions or ())
        to_commit = {tp: off for tp, off in offsets.items() if tp in owned}
        try:
            self._ec.commit(to_commit)
        except StreamsError as exc:
            if self.checkpoint_path is None:
                raise
            # The checkpoint already holds these offsets, and it is what a restart uses.
            log.warning("commit after checkpoint (%s) failed, the checkpoint still holds them: %s", why, exc)

    def _due(self) -> bool:
        if not self._dirty:
            return False
        if self.checkpoint_path is None:
            return True
        n = self.checkpoint_every_n
        if n is not None and self._events_learned - self._learned_at_checkpoint >= n:
            return True
        s = self.checkpoint_every_s
        return s is not None and self.clock() - self._last_checkpoint_clock >= s

    # ------------------------------------------------------------------ rebalance

    def _on_assigned(self, partitions: list[TopicPartition]) -> None:
        # Inside a rebalance callback: only seek here (no blocking calls, see transport).
        if self._ec is None:
            return
        known = {tp: self._offsets[tp] for tp in partitions if tp in self._offsets}
        for tp, off in known.items():
            self._ec.seek(tp, off)
        self._ec.skip_below(known)
        self._check_ends.update(known)
        log.info("assigned %s; from checkpoint: %s", [f"{t}[{p}]" for t, p in partitions],
                 {f"{t}[{p}]": off for (t, p), off in known.items()})

    def _check_checkpoint_against_ends(self) -> None:
        """Warn when a partition ends below the checkpoint's offset (topic recreated?)."""
        known, self._check_ends = self._check_ends, {}
        if not known or self._ec is None:
            return
        try:
            ends = self._ec.consumer.end_offsets(list(known))
        except Exception as exc:  # a warning only: never stop learning for it
            log.debug("could not read end offsets: %r", exc)
            return
        for tp, off in known.items():
            if ends.get(tp, off) < off:
                log.warning(
                    "%s[%d] ends at %d, below the checkpoint offset %d: was the topic recreated? "
                    "records below %d will be skipped", tp.topic, tp.partition, ends[tp], off, off)

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        log.info("revoking %s: checkpoint and commit first", [f"{t}[{p}]" for t, p in partitions])
        self._checkpoint_and_commit("revoke", partitions)

    # ------------------------------------------------------------------ the loop

    @property
    def learned_offsets(self) -> dict[TopicPartition, int]:
        """Next offset per partition of what the model has learned (checkpointed or not)."""
        return dict(self._offsets)

    def stop(self) -> None:
        """Finish the batch in hand, checkpoint, commit and return from :meth:`run`."""
        self._stop.set()

    def install_signal_handlers(self, exit_after_s: float | None = STOP_DEADLINE_S) -> None:
        """Stop gracefully on SIGTERM and SIGINT (call from the main thread).

        ``exit_after_s``: if the graceful stop has not returned that long after the first
        signal (a dead broker can block a final commit or the client's close for ever),
        the process exits with status 3. That loses nothing and learns nothing twice:
        the newest checkpoint holds the model with the offsets it reflects, and a restart
        resumes from there. ``None`` waits for ever.
        """

        def on_signal(signum: int, _frame: Any) -> None:
            first = not self._stop.is_set()
            self.stop()
            if first and exit_after_s is not None:
                exit_if_still_stopping(exit_after_s, f"learner {self.group_id} (signal {signum})")

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    def _open(self) -> EventConsumer:
        producer = self.producer
        if producer is None:
            producer = make_producer(self.settings)
            self._own_producer = True
        consumer = self.consumer_factory(self.settings, self.group_id, self.batch_size)
        writer = DeadLetterWriter(producer, self.topics.dead_letter, self.group_id, clock=self.wall_clock)
        ec = EventConsumer(consumer, writer, batch_size=self.batch_size, poll_timeout_s=self.poll_timeout_s,
                           producer=producer if self._own_producer else None)
        self._ec = ec
        self._counts = ec.counts
        ec.subscribe([self.topics.events], on_assigned=self._on_assigned, on_revoked=self._on_revoked)
        return ec

    def _learn_columns(self, cols: EventColumns) -> int:
        """Learn the impressions of a column batch: through ``predict_learn_columns`` (no
        dict per event) where the learner has it; a learner without it, or one that refuses
        (``NotImplementedError``), gets the batch's :class:`~learners.base.ColumnExamples`
        (the examples ``event_to_x`` builds; a learner that reads a field at a time, the
        two-tower encoder, reads them from the columns without building a dict per event)."""
        imps = cols.of_kind("impression")
        if len(imps):
            with self._metrics_lock:  # stats() may be read from a metrics-scrape thread
                columns = getattr(self.learner, "predict_learn_columns", None)
                try:
                    if columns is None:
                        raise NotImplementedError
                    p = columns(imps)
                except NotImplementedError:
                    prequential_step(self.learner, ColumnExamples(imps), imps.label, self.metrics)
                else:
                    self.metrics.update(imps.label, p)
        return len(imps)

    def run(self) -> RuntimeStats:
        """Consume until stopped (or ``max_events`` / ``idle_timeout_s``); returns the
        final stats. The learner keeps its state afterwards."""
        ec = self._open()
        self._started = self.clock()
        self._rate_mark = (self._started, 0)
        last_stats = self._started
        idle = IdleTimer(self.idle_timeout_s, self.clock)
        try:
            while not self._stop.is_set():
                left = None if self.max_events is None else self.max_events - self._learned_run
                if left is not None and left <= 0:
                    break
                batch = ec.poll_columns(max_events=left)
                if self._check_ends:
                    self._check_checkpoint_against_ends()
                now = self.clock()
                if batch is not None:
                    idle.record()
                    self._failed = True  # until the whole batch is learned
                    n = self._learn_columns(batch.columns)
                    self._offsets.update(batch.offsets)
                    self._events_learned += n
                    self._learned_run += n
                    self._skipped += len(batch) - n
                    self._dirty = self._dirty or bool(batch.offsets)
                    self._failed = False
                elif idle.expired(bool(ec.consumer.assignment())):
                    break
                if self._due():
                    self._checkpoint_and_commit("interval")
                if now - last_stats >= self.stats_every_s:
                    last_stats = now
                    self._measure_lag()
                    if self.on_progress is not None:
                        self.on_progress(self.stats())
            self._checkpoint_and_commit("stop")
            self._measure_lag()
        except BaseException:
            self._failed = True  # closing must not checkpoint a state we are unsure of
            raise
        finally:
            try:
                ec.close()
            finally:
                self._ec = None
        return self.stats()

    # ------------------------------------------------------------------ stats

    def _measure_lag(self) -> None:
        ec = self._ec
        if ec is None:
            return
        assigned = sorted(ec.consumer.assignment())
        if not assigned:
            self._lag = {}
            self._lag_measured = True
            return
        try:
            # High watermarks from the fetches already made: no broker round trip on the
            # learning loop. A partition not fetched yet is asked for once, directly.
            ends = ec.consumer.end_offsets(assigned, cached=True)
            missing = [tp for tp in assigned if tp not in ends]
            if missing:
                ends.update(ec.consumer.end_offsets(missing))
        except Exception as exc:  # lag is best effort; never stop learning for it
            log.debug("could not measure lag: %r", exc)
            return
        lag = {}
        for tp in assigned:
            pos = self._offsets.get(tp)
            if pos is None:
                pos = ec.consumer.position(tp)
            if pos is not None and tp in ends:
                lag[tp] = max(0, ends[tp] - pos)
        self._lag = lag
        self._lag_measured = True
        now = self.clock()
        t0, n0 = self._rate_mark
        if now > t0:
            self._rate = (self._learned_run - n0) / (now - t0)
        self._rate_mark = (now, self._learned_run)

    def stats(self) -> RuntimeStats:
        """A snapshot of counters, rates, lag and metrics."""
        counts = self._counts
        elapsed = max(self.clock() - self._started, 1e-9)
        return RuntimeStats(
            group_id=self.group_id,
            learner=str(getattr(self.learner, "spec", {}).get("name", type(self.learner).__name__)),
            events_learned=self._events_learned,
            events_learned_run=self._learned_run,
            events_per_s=self._rate,
            events_per_s_run=self._learned_run / elapsed,
            records=counts.records,
            skipped=self._skipped,
            dead_lettered=counts.dead_lettered,
            duplicates=counts.duplicates,
            lag=dict(self._lag),
            total_lag=sum(self._lag.values()) if self._lag_measured else None,
            checkpoints=self._checkpoints,
            last_checkpoint_at=self._last_checkpoint_wall,
            elapsed_s=elapsed,
            metrics=self._metrics_snapshot(),
        )

    def _metrics_snapshot(self) -> dict[str, Any]:
        with self._metrics_lock:
            return metrics_summary(self.metrics)
