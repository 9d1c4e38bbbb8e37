"""Feed the indexer from the click stream: the catalogue, and a held-out window.

:class:`RecentWindow` keeps the latest labelled impressions with their Kafka position.
Given a checkpoint's offsets it returns the impressions that checkpoint has *not*
learned from: a held-out window for the guardrail's offline AUC.

:class:`StreamFollower` is a background thread that reads the events topic from the
beginning without a consumer group (it commits nothing and never disturbs the
learner's group), adds every item it sees to the :class:`~indexer.catalogue.Catalogue`
and every impression to the window. It also reads the items topic (new, changed and
retired items, :mod:`streams.items`) into the catalogue, which records the item-log
sequence each build covers. Records that fail to decode are counted and
skipped here (the ingest path dead-letters them).

>>> w = RecentWindow(maxlen=3)
>>> for off, y in enumerate([0, 1, 1, 0]):
...     w.add("events", 0, off, {"user_id": "u", "item_id": f"i{off}"}, y)
>>> xs, ys = w.held_out({"events": {0: 2}})
>>> [x["item_id"] for x in xs], ys.tolist()
(['i2', 'i3'], [1, 0])
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from indexer.catalogue import Catalogue
from indexer.errors import IndexerError
from indexer.item_follow import items_partition
from learners.base import X, event_to_x
from streams.errors import EventValidationError
from streams.events import decode_event
from streams.items import ItemEventError, decode_item_event
from streams.topics import ITEMS_PARTITIONS, Topics
from streams.transport import Consumer, KafkaSettings, TopicPartition, ensure_topics, make_consumer

__all__ = ["RecentWindow", "StreamFollower"]

log = logging.getLogger(__name__)


class RecentWindow:
    """The last ``maxlen`` labelled impressions, with their (topic, partition, offset)."""

    def __init__(self, maxlen: int = 20_000) -> None:
        self.maxlen = maxlen
        self._lock = threading.Lock()
        self._rows: collections.deque[tuple[str, int, int, X, int]] = collections.deque(maxlen=maxlen)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, topic: str, partition: int, offset: int, x: X, y: int) -> None:
        """Append one labelled example read at ``topic[partition]@offset``."""
        with self._lock:
            self._rows.append((topic, partition, offset, x, int(y)))

    def held_out(self, offsets: Mapping[str, Mapping[int, int]]) -> tuple[list[X], np.ndarray]:
        """Examples at or beyond ``offsets`` (``{topic: {partition: next_offset}}``), i.e.
        not learned by a checkpoint with those offsets. Topics the offsets do not name
        count as unlearned."""
        with self._lock:
            rows = list(self._rows)
        xs: list[X] = []
        ys: list[int] = []
        for topic, partition, offset, x, y in rows:
            nxt = offsets.get(topic, {}).get(partition, 0)
            if offset >= nxt:
                xs.append(x)
                ys.append(y)
        return xs, np.asarray(ys, dtype=np.int64)

    def learned_clicks(self, offsets: Mapping[str, Mapping[int, int]]) -> dict[str, int]:
        """Clicks per item id on the kept examples *before* ``offsets`` (what a checkpoint
        with those offsets learned): the popularity baseline of retrieval evaluation.

        >>> w = RecentWindow()
        >>> for off, (item, y) in enumerate([("a", 1), ("b", 1), ("a", 1), ("a", 0), ("b", 1)]):
        ...     w.add("events", 0, off, {"item_id": item}, y)
        >>> w.learned_clicks({"events": {0: 4}})
        {'a': 2, 'b': 1}
        """
        with self._lock:
            rows = list(self._rows)
        counts: collections.Counter[str] = collections.Counter()
        for topic, partition, offset, x, y in rows:
            if y == 1 and offset < offsets.get(topic, {}).get(partition, 0):
                counts[str(x.get("item_id"))] += 1
        return dict(counts)


class StreamFollower:
    """Reads the events topic into a catalogue (and a window) on a background thread.

    Parameters
    ----------
    settings
        Kafka settings.
    catalogue
        Receives every item of every impression and click.
    window
        Receives every impression with its label (None: not kept).
    topics
        Topic names of this deployment.
    poll_timeout_s
        How long one poll waits (bounds :meth:`stop` latency).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        catalogue: Catalogue,
        window: RecentWindow | None = None,
        *,
        topics: Topics = Topics(),
        poll_timeout_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.window = window
        self.topics = topics
        self.poll_timeout_s = poll_timeout_s
        self.records = 0
        self.bad_records = 0
        self.item_events = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def __repr__(self) -> str:
        return f"StreamFollower(topics={self.topics!r})"

    def start(self) -> "StreamFollower":
        """Start the background thread; returns self."""
        if self._thread is not None:
            raise IndexerError("StreamFollower already started")
        self._thread = threading.Thread(target=self._run, name="index-stream-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to stop and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def handle(self, records: Sequence[Any]) -> None:
        """Take a batch of :class:`streams.transport.Record` (public for tests)."""
        for record in records:
            self.records += 1
            if record.topic == self.topics.items:
                self._handle_item(record)
                continue
            try:
                event = decode_event(record.value)
            except EventValidationError as exc:
                self.bad_records += 1
                log.debug("skipping bad record %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
                continue
            self.catalogue.observe_event(event)
            if self.window is not None and event.kind == "impression" and event.label is not None:
                self.window.add(record.topic, record.partition, record.offset, event_to_x(event), event.label)

    def _handle_item(self, record: Any) -> None:
        try:
            event = decode_item_event(record.value)
        except ItemEventError as exc:
            self.bad_records += 1
            log.debug("skipping bad item record %s@%d: %s", record.topic, record.offset, exc)
            return
        self.catalogue.observe_item_event(event, record.offset + 1)
        self.item_events += 1

    def _assign(self, consumer: Consumer) -> bool:
        partitions = consumer.partitions_for(self.topics.events)
        if not partitions:
            return False
        tps = [TopicPartition(self.topics.events, p) for p in partitions]
        ensure_topics(self.settings, {self.topics.items: ITEMS_PARTITIONS})  # item events may come later
        tps.append(items_partition(consumer, self.topics))
        consumer.assign(tps)  # no group, nothing committed: starts at the earliest offset
        return True

    def _run(self) -> None:
        consumer = make_consumer(self.settings, None)
        try:
            while not self._assign(consumer):
                if self._stop.wait(self.poll_timeout_s):
                    return
            while not self._stop.is_set():
                self.handle(consumer.poll(timeout_s=self.poll_timeout_s))
        except Exception as exc:  # noqa: BLE001 - a background thread must report, not vanish
            self.error = repr(exc)
            log.exception("stream follower stopped")
        finally:
            consumer.close()
