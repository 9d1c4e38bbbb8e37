"""Scorer side: follow the control topic and hot-swap the announced index versions.

:class:`IndexWatcher` runs one background thread. It starts at the last announcement
on the control topic (so a late-starting scorer serves the current version at once),
then follows new ones in log order: each announced version is loaded completely
(:func:`~indexer.handle.load_handle`) and swapped into the :class:`IndexHolder` with one
reference assignment. Queries never wait for a load. A version that fails to load is
logged and counted and the served version stays.

A ``publish`` announcement of a version older than the served one is stale (a
replayed record) and is skipped; a ``rollback`` announcement is always applied.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from indexer.announce import Announcement
from indexer.artifacts import ArtifactStore, version_dirname
from indexer.errors import IndexerError
from indexer.handle import IndexHandle, IndexHolder, load_handle
from streams.errors import TowerstreamError
from streams.topics import Topics
from streams.transport import Consumer, KafkaSettings, TopicPartition, make_consumer

__all__ = ["IndexWatcher"]

log = logging.getLogger(__name__)


class IndexWatcher:
    """Follows announcements and swaps the holder's handle.

    Parameters
    ----------
    settings
        Kafka settings.
    holder
        The scorer's :class:`IndexHolder`.
    root
        The artifact store root as this host sees it; announced versions are loaded
        from ``root/versions/vNNNNNNNN`` (None: from the announced path). With a root,
        the served version of the store is loaded at start when the topic is empty.
    topics
        Topic names of this deployment.
    poll_timeout_s
        How long one poll waits (bounds :meth:`stop` latency).
    loader
        Loads a version directory into a handle (``load_handle``).
    on_swap
        Called with the new handle after each swap (metrics hook).
    swapper
        Serves a loaded version instead of ``holder.swap`` (the item-delta follower's
        :meth:`~indexer.item_follow.ItemDeltaFollower.swap_base`, which replays the item
        deltas the version lacks before it is served).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        holder: IndexHolder,
        root: str | Path | None = None,
        *,
        topics: Topics = Topics(),
        poll_timeout_s: float = 0.5,
        loader: Callable[[Path], IndexHandle] = load_handle,
        on_swap: Callable[[IndexHandle], None] | None = None,
        swapper: Callable[[IndexHandle], object] | None = None,
    ) -> None:
        self.settings = settings
        self.holder = holder
        self.root = None if root is None else Path(root)
        self.topics = topics
        self.poll_timeout_s = poll_timeout_s
        self.loader = loader
        self.on_swap = on_swap
        self.swapper = swapper
        self.swaps = 0
        self.skipped = 0
        self.errors = 0
        self.last_error: str | None = None
        self.ready = threading.Event()  # set once the initial position is taken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"IndexWatcher(root={str(self.root)!r}, topics={self.topics!r})"

    # ------------------------------------------------------------------ control
    def start(self) -> "IndexWatcher":
        """Start the background thread; returns self."""
        if self._thread is not None:
            raise IndexerError("IndexWatcher already started")
        self._thread = threading.Thread(target=self._run, name="index-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to stop and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> "IndexWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ work
    def _resolve(self, announcement: Announcement) -> Path:
        if self.root is not None:
            return self.root / "versions" / version_dirname(announcement.version)
        return Path(announcement.path)

    def apply(self, announcement: Announcement) -> bool:
        """Load and swap one announced version; True if the served handle changed."""
        current = self.holder.version
        if current == announcement.version:
            return False
        if announcement.action == "publish" and current is not None and announcement.version < current:
            self.skipped += 1
            log.info("skipping stale announcement of version %d (serving %d)", announcement.version, current)
            return False
        try:
            handle = self.loader(self._resolve(announcement))
        except (TowerstreamError, OSError, RuntimeError) as exc:
            # RuntimeError: faiss could not read the index file.
            self.errors += 1
            self.last_error = f"version {announcement.version}: {exc}"
            log.error("could not load announced index version %d: %s; still serving %s",
                      announcement.version, exc, current)
            return False
        if self.swapper is not None:
            self.swapper(handle)
        else:
            self.holder.swap(handle)
        self.swaps += 1
        if self.on_swap is not None:
            self.on_swap(handle)
        return True

    def _initial_from_store(self) -> None:
        if self.root is None or self.holder.version is not None:
            return
        info = ArtifactStore(self.root).current_info()
        if info is not None:
            self.apply(Announcement.for_version(info))

    def _open(self) -> tuple[Consumer, TopicPartition]:
        consumer = make_consumer(self.settings, None)
        tp = TopicPartition(self.topics.index_control, 0)
        end = consumer.end_offsets([tp]).get(tp, 0) if consumer.partitions_for(tp.topic) else 0
        if end == 0:
            # Nothing announced yet: serve what the store serves, then wait for the topic.
            self._initial_from_store()
            self.ready.set()
            while not consumer.partitions_for(tp.topic):
                if self._stop.wait(self.poll_timeout_s):
                    break
        consumer.assign([tp])
        consumer.seek(tp, max(end - 1, 0))
        return consumer, tp

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            consumer, tp = self._open()
            self.ready.set()
            while not self._stop.is_set():
                for record in consumer.poll(timeout_s=self.poll_timeout_s):
                    if record.value is None:
                        continue
                    try:
                        announcement = Announcement.from_bytes(record.value)
                    except IndexerError as exc:
                        self.errors += 1
                        self.last_error = str(exc)
                        log.error("bad record at %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
                        continue
                    self.apply(announcement)
                self.holder.reap()  # free replaced versions once their last query is done
        except TowerstreamError as exc:
            self.errors += 1
            self.last_error = str(exc)
            log.error("index watcher stopped: %s", exc)
        finally:
            self.ready.set()
            if consumer is not None:
                consumer.close()

    def wait_for_version(self, version: int, timeout_s: float = 30.0) -> bool:
        """Block until the holder serves ``version`` (tests and start-up scripts)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.holder.version == version:
                return True
            time.sleep(0.01)
        return self.holder.version == version
