"""The scorer's Kafka loops: requests in, ranked lists out; impressions/clicks for online AUC.

:class:`RequestConsumer` follows ``Topics.requests`` in a consumer group through the
shared :class:`~streams.consumer.EventConsumer` (decode + validate; a bad record goes to
the dead-letter topic with its reason). Each batch of request events is scored with
:meth:`~serving.scorer.Scorer.score_many`, every ranked list is produced to
``Topics.rankings`` keyed by request id; before offsets are committed (after every batch,
or at most every ``commit_interval_s``, and whenever the topic goes idle) the producer is
flushed, so an offset is committed only once the rankings of its requests are
acknowledged: a crash anywhere re-serves them, never skips them (at-least-once; a ranking
may be produced twice). A valid event of another kind on the
requests topic is dead-lettered with reason ``kind``.

Until a model and an index are loaded the loop holds the batch (no commit) and retries.

:class:`EventsFollower` follows ``Topics.events`` in its own group and feeds the
:class:`~serving.online_eval.OnlineEvaluator` (and the pre-ranker's item features).

Ranking record (JSON)::

    {"request_id": ..., "user_id": ..., "items": [{"item_id", "score", "rank"}, ...],
     "index_version": int, "model_version": ..., "learner": str, "latency_seconds": float}
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import orjson

from serving.errors import NotReadyError
from serving.metrics import Metrics
from serving.online_eval import OnlineEvaluator
from serving.scorer import ItemFeatureStore, Ranking, Scorer, ScoreRequest
from streams.consumer import EventBatch, EventConsumer, open_event_consumer
from streams.topics import Topics
from streams.transport import KafkaSettings, Producer, TopicPartition, make_producer

__all__ = [
    "LoopStats",
    "RequestConsumer",
    "EventsFollower",
    "open_request_consumer",
    "open_events_follower",
    "ranking_value",
    "close_loop",
]

logger = logging.getLogger(__name__)


def ranking_value(ranking: Ranking) -> bytes:
    """The rankings-topic record value of one ranked list (JSON bytes)."""
    return orjson.dumps(ranking.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)


class _Stopped(Exception):
    """The loop was asked to stop while a batch was held: leave it uncommitted."""


@dataclass
class LoopStats:
    """Running totals of one loop."""

    batches: int = 0
    events: int = 0
    produced: int = 0
    dead_lettered: int = 0
    not_ready_waits: int = 0
    lag: dict[str, int] = field(default_factory=dict)


class _Loop:
    """Poll -> handle -> commit, with consumption, dead-letter and lag metrics."""

    def __init__(self, consumer: EventConsumer, *, topic: str, metrics: Metrics | None, group_id: str,
                 lag_interval_s: float, clock: Callable[[], float], commit_interval_s: float = 0.0) -> None:
        if commit_interval_s < 0:
            raise ValueError(f"commit_interval_s must be >= 0, got {commit_interval_s}")
        self.consumer = consumer
        self.topic = topic
        self.commit_interval_s = commit_interval_s
        self._pending: dict[TopicPartition, int] = {}
        self._last_commit = 0.0
        self.metrics = metrics
        self.group_id = group_id
        self.lag_interval_s = lag_interval_s
        self.clock = clock
        self.stats = LoopStats()
        self._stop = threading.Event()
        self._committed: dict[TopicPartition, int] = {}
        self._dl_seen: dict[str, int] = {}
        self._last_lag = -float("inf")

    def stop(self) -> None:
        """Return from :meth:`run` after the batch in hand (thread-safe)."""
        self._stop.set()
        self.consumer.stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def handle(self, batch: EventBatch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _account(self, batch: EventBatch) -> None:
        self.stats.batches += 1
        self.stats.events += len(batch.events)
        if self.metrics is None:
            self._account_dead_letters()
            return
        per_topic: dict[str, int] = {}
        for rec in batch.records:
            per_topic[rec.topic] = per_topic.get(rec.topic, 0) + 1
        for topic, n in per_topic.items():
            self.metrics.events_consumed.labels(topic=topic).inc(n)
        self._account_dead_letters()

    def _account_dead_letters(self) -> None:
        counts = self.consumer.dead_letters.counts
        for reason, n in counts.items():
            delta = n - self._dl_seen.get(reason, 0)
            if delta > 0:
                self.stats.dead_lettered += delta
                if self.metrics is not None:
                    self.metrics.dead_letters.labels(topic=self.topic, reason=reason).inc(delta)
                self._dl_seen[reason] = n

    def _commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.consumer.commit(offsets)
        self._committed.update(offsets)

    def update_lag(self, force: bool = False) -> dict[str, int]:
        """Lag per topic = end offset - committed offset, over the assigned partitions."""
        now = self.clock()
        if not force and now - self._last_lag < self.lag_interval_s:
            return self.stats.lag
        self._last_lag = now
        kc = self.consumer.consumer
        assigned = kc.assignment()
        if not assigned:
            return self.stats.lag
        try:
            ends = kc.end_offsets(assigned, cached=True)  # last fetch's high watermarks: no round trip
        except Exception as exc:  # lag is best effort: never stop serving for it
            logger.debug("end offsets unavailable: %s", exc)
            return self.stats.lag
        lag: dict[str, int] = {}
        for tp, end in ends.items():
            done = self._committed.get(tp)
            if done is None:
                done = kc.position(tp)
            if done is not None:
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - done)
        self.stats.lag = lag
        if self.metrics is not None:
            for topic, n in lag.items():
                self.metrics.consumer_lag.labels(topic=topic, group=self.group_id).set(n)
        return lag

    def before_commit(self) -> None:
        """Make what the handled batches produced durable (the request loop flushes here)."""

    def _flush_and_commit(self) -> None:
        if self._pending:
            self.before_commit()
            self._commit(self._pending)
            self._pending = {}
        self._last_commit = self.clock()

    def run(self, *, max_events: int | None = None, idle_timeout_s: float | None = None) -> LoopStats:
        """Handle batches until :meth:`stop`, ``max_events`` valid events, or
        ``idle_timeout_s`` without a record. Offsets are committed after
        :meth:`before_commit`, at most every ``commit_interval_s`` and whenever the topic is
        idle; an error in a batch leaves it (and the batches not yet committed) uncommitted."""
        last_record = self.clock()
        self._last_commit = last_record
        while not self._stop.is_set():
            left = None if max_events is None else max_events - self.stats.events
            if left is not None and left <= 0:
                break
            batch = self.consumer.poll_batch(max_events=left)
            now = self.clock()
            if batch is None:
                self._flush_and_commit()
                self.update_lag()
                if idle_timeout_s is not None and now - last_record >= idle_timeout_s:
                    break
                continue
            last_record = now
            try:
                if batch.events:
                    self.handle(batch)
            except _Stopped:  # the held batch is not in _pending: it stays uncommitted
                break
            self._account(batch)
            self._pending.update(batch.offsets)
            if now - self._last_commit >= self.commit_interval_s:
                self._flush_and_commit()
            self.update_lag()
        self._flush_and_commit()  # what was handled before a stop is still committed
        self.update_lag(force=True)
        return self.stats


class RequestConsumer(_Loop):
    """Scores request events and produces ranked lists (see the module docstring).

    Parameters
    ----------
    consumer
        An :class:`EventConsumer` subscribed to ``topics.requests``.
    producer
        Where rankings go (flushed before each commit).
    scorer
        The retrieve + pre-rank core.
    topics
        Topic names.
    metrics
        Process metrics (requests, rankings, consumption, lag, latency via the scorer).
    evaluator
        Told which model served each request, for online AUC.
    score_batch
        Requests scored per :meth:`Scorer.score_many` call.
    not_ready_backoff_s
        Wait between readiness checks while no model or index is loaded.
    commit_interval_s
        Flush the rankings and commit at most this often (0: after every batch). A
        flush + commit costs two broker round trips; batching them keeps the latency of
        a lightly loaded loop at the scoring time. A crash re-serves what was not yet
        committed (at-least-once).
    group_id
        The ``group`` label of the lag metric.
    wall_clock
        Epoch seconds, compared with the records' Kafka timestamps for the ``queue`` and
        ``end_to_end`` latency stages.
    """

    def __init__(
        self,
        consumer: EventConsumer,
        producer: Producer,
        scorer: Scorer,
        *,
        topics: Topics = Topics(),
        metrics: Metrics | None = None,
        evaluator: OnlineEvaluator | None = None,
        score_batch: int = 64,
        not_ready_backoff_s: float = 0.5,
        commit_interval_s: float = 0.0,
        lag_interval_s: float = 5.0,
        group_id: str = "towerstream-scorer",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(consumer, topic=topics.requests, metrics=metrics, group_id=group_id,
                         lag_interval_s=lag_interval_s, clock=clock, commit_interval_s=commit_interval_s)
        if score_batch < 1:
            raise ValueError(f"score_batch must be >= 1, got {score_batch}")
        self.producer = producer
        self.scorer = scorer
        self.topics = topics
        self.evaluator = evaluator
        self.score_batch = score_batch
        self.not_ready_backoff_s = not_ready_backoff_s
        self.wall_clock = wall_clock

    def _wait_ready(self) -> None:
        logged = False
        while True:
            ready, reason = self.scorer.readiness()
            if ready:
                return
            if not logged:
                logger.warning("holding request batch: %s", reason)
                logged = True
            self.stats.not_ready_waits += 1
            if self._stop.wait(self.not_ready_backoff_s):
                raise _Stopped()

    def handle(self, batch: EventBatch) -> None:
        """Score the batch's requests and send their rankings (flushed before the commit)."""
        received = self.wall_clock()  # the poll that returned this batch just ended
        requests: list[ScoreRequest] = []
        sent_at: list[float] = []  # the records' Kafka timestamps (producer clock), seconds; -1: none
        wrong = 0
        for event, record in zip(batch.events, batch.records):
            if event.kind == "request":
                requests.append(ScoreRequest.from_event(event))
                sent_at.append(record.timestamp / 1000.0)
            else:
                self.consumer.dead_letters.write(
                    record, "kind",
                    f"a {event.kind} event on the requests topic {record.topic}: only request events belong "
                    f"there (impressions and clicks go to {self.topics.events})",
                )
                wrong += 1
        if wrong:
            self.consumer.dead_letters.flush()
        m = self.metrics
        for start in range(0, len(requests), self.score_batch):
            chunk = requests[start:start + self.score_batch]
            while True:
                self._wait_ready()
                began = self.wall_clock()
                try:
                    rankings = self.scorer.score_many(chunk)
                    break
                except NotReadyError:  # lost the race with an unload: wait again
                    continue
            model = self.scorer.learner_source.current()
            for r in rankings:
                self.producer.send(self.topics.rankings, ranking_value(r), key=r.request_id.encode("utf-8"))
                if self.evaluator is not None and model is not None and model.version == r.model_version:
                    self.evaluator.record_served(r.request_id, model)
            if m is not None:
                m.requests.labels(source="kafka", outcome="ok").inc(len(rankings))
                self._observe_waits(sent_at[start:start + self.score_batch], received, began, self.wall_clock())
        self.stats.produced += len(requests)
        if m is not None and requests:
            m.rankings_produced.inc(len(requests))

    def _observe_waits(self, sent_at: list[float], received: float, began: float, answered: float) -> None:
        """From a request's record timestamp: ``fetch`` to the poll that returned it, ``queue``
        to the start of its scoring call, ``end_to_end`` to its ranking handed to the producer.
        Records without a timestamp (or from a clock ahead of ours) are left out rather than
        counted as zero."""
        h = self.metrics.score_latency
        fetch, queue, e2e = h.labels(stage="fetch"), h.labels(stage="queue"), h.labels(stage="end_to_end")
        for t in sent_at:
            if 0 < t <= received:
                fetch.observe(received - t)
                queue.observe(began - t)
                e2e.observe(answered - t)

    def before_commit(self) -> None:
        """Wait until every ranking sent so far is acknowledged (raises if one was not)."""
        self.producer.flush()


class EventsFollower(_Loop):
    """Feeds impressions and clicks to the online evaluator (and item features to the
    pre-ranker's :class:`~serving.scorer.ItemFeatureStore`), committing after each batch.

    The evaluator's watermark is the newest event time of the *slowest* partition that
    delivered records in the last ``idle_partition_s`` seconds: partitions are consumed
    at different speeds, and a window must not close on one partition because another
    one ran ahead. An idle partition stops holding the watermark back.
    """

    def __init__(
        self,
        consumer: EventConsumer,
        evaluator: OnlineEvaluator,
        *,
        items: ItemFeatureStore | None = None,
        topics: Topics = Topics(),
        metrics: Metrics | None = None,
        lag_interval_s: float = 5.0,
        idle_partition_s: float = 10.0,
        commit_interval_s: float = 1.0,
        group_id: str = "towerstream-scorer-eval",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(consumer, topic=topics.events, metrics=metrics, group_id=group_id,
                         lag_interval_s=lag_interval_s, clock=clock, commit_interval_s=commit_interval_s)
        self.evaluator = evaluator
        self.items = items
        self.idle_partition_s = idle_partition_s
        self._partitions: dict[tuple[str, int], tuple[float, float]] = {}  # -> (newest event time, last seen)

    def watermark(self) -> float | None:
        """The slowest active partition's newest event time (None before any event)."""
        now = self.clock()
        active = [t for t, seen in self._partitions.values() if now - seen <= self.idle_partition_s]
        return min(active) if active else None

    def handle(self, batch: EventBatch) -> None:
        now = self.clock()
        parts = self._partitions
        for e, rec in zip(batch.events, batch.records):
            if self.items is not None:
                self.items.observe_event(e)
            if e.kind != "request":
                self.evaluator.observe(e)
            key = (rec.topic, rec.partition)
            newest = parts.get(key, (e.event_time, now))[0]
            parts[key] = (max(newest, e.event_time), now)
        mark = self.watermark()
        if mark is not None:
            self.evaluator.advance(mark)


def open_request_consumer(
    settings: KafkaSettings,
    scorer: Scorer,
    *,
    group_id: str = "towerstream-scorer",
    topics: Topics = Topics(),
    metrics: Metrics | None = None,
    evaluator: OnlineEvaluator | None = None,
    batch_size: int = 256,
    score_batch: int = 64,
    commit_interval_s: float = 1.0,
) -> RequestConsumer:
    """A :class:`RequestConsumer` subscribed to ``topics.requests`` in ``group_id``, with
    its own rankings producer. Close with :func:`close_loop`."""
    # eager: a poll returns the requests that are there instead of waiting to fill a batch
    ec = open_event_consumer(settings, group_id, [topics.requests], topics.dead_letter,
                             batch_size=batch_size, poll_timeout_s=0.2, eager=True)
    return RequestConsumer(ec, make_producer(settings), scorer, topics=topics, metrics=metrics,
                           evaluator=evaluator, score_batch=score_batch, group_id=group_id,
                           commit_interval_s=commit_interval_s)


def open_events_follower(
    settings: KafkaSettings,
    evaluator: OnlineEvaluator,
    *,
    group_id: str = "towerstream-scorer-eval",
    topics: Topics = Topics(),
    items: ItemFeatureStore | None = None,
    metrics: Metrics | None = None,
    batch_size: int = 2000,
) -> EventsFollower:
    """An :class:`EventsFollower` subscribed to ``topics.events`` in ``group_id``."""
    ec = open_event_consumer(settings, group_id, [topics.events], topics.dead_letter,
                             batch_size=batch_size, poll_timeout_s=0.5)
    return EventsFollower(ec, evaluator, items=items, topics=topics, metrics=metrics, group_id=group_id)


def close_loop(loop: _Loop) -> None:
    """Close a loop's consumer (and the request loop's producer)."""
    try:
        loop.consumer.close()
    finally:
        producer = getattr(loop, "producer", None)
        if producer is not None:
            producer.close()

