"""Announcements of served index versions on the Kafka control topic.

The control topic (:attr:`streams.topics.Topics.index_control`) has one partition and is
meant to be compacted; every record has the key ``b"latest"``, so after compaction it
still holds the last announcement, which a late-starting scorer reads with
:func:`latest_announcement`. Records are JSON:

``{"version": 7, "path": ".../versions/v00000007", "action": "publish",
"announced_at": 1.7e9, "manifest": {...}}``

``action`` is ``"publish"`` for a new build and ``"rollback"`` when an older version is
served again.

>>> a = Announcement(version=3, path="/idx/versions/v00000003", manifest={"item_count": 10})
>>> Announcement.from_bytes(a.to_bytes()) == a
True
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import orjson

from indexer.artifacts import VersionInfo
from indexer.errors import IndexerError
from streams.topics import Topics
from streams.transport import KafkaSettings, Producer, TopicPartition, ensure_topics, make_consumer

__all__ = [
    "ANNOUNCE_KEY",
    "Announcement",
    "Announcer",
    "latest_announcement",
    "ensure_control_topic",
]

log = logging.getLogger(__name__)

ANNOUNCE_KEY = b"latest"
AnnounceAction = Literal["publish", "rollback"]


@dataclass(frozen=True)
class Announcement:
    """One control-topic record: which version to serve and where it lies."""

    version: int
    path: str
    manifest: Mapping[str, Any] = field(default_factory=dict)
    action: AnnounceAction = "publish"
    announced_at: float = 0.0

    @classmethod
    def for_version(cls, info: VersionInfo, action: AnnounceAction = "publish") -> "Announcement":
        """The announcement of a version written by :class:`~indexer.artifacts.ArtifactStore`."""
        return cls(version=info.version, path=str(info.path), manifest=dict(info.manifest), action=action,
                   announced_at=time.time())

    def to_bytes(self) -> bytes:
        """The record value (JSON)."""
        return orjson.dumps({
            "version": self.version,
            "path": self.path,
            "action": self.action,
            "announced_at": self.announced_at,
            "manifest": self.manifest,
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Announcement":
        """Parse a record value; raises :class:`IndexerError` if it is not an announcement."""
        try:
            obj = orjson.loads(raw)
            version = obj["version"]
            path = obj["path"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise IndexerError(f"not an index announcement ({exc!r}): {raw[:200]!r}") from None
        if isinstance(version, bool) or not isinstance(version, int) or not isinstance(path, str):
            raise IndexerError(f"announcement needs an integer 'version' and a string 'path': {raw[:200]!r}")
        action = obj.get("action", "publish")
        if action not in ("publish", "rollback"):
            raise IndexerError(f"unknown announcement action {action!r}")
        return cls(version=version, path=path, manifest=obj.get("manifest") or {}, action=action,
                   announced_at=float(obj.get("announced_at", 0.0)))


def ensure_control_topic(settings: KafkaSettings, topics: Topics = Topics()) -> str:
    """Create the control topic (one partition) if it is missing; returns its name."""
    ensure_topics(settings, {topics.index_control: 1})
    return topics.index_control


class Announcer:
    """Sends announcements to the control topic and waits for delivery.

    Parameters
    ----------
    producer
        A :func:`streams.transport.make_producer` producer (the caller closes it).
    topics
        Topic names of this deployment.
    """

    def __init__(self, producer: Producer, topics: Topics = Topics()) -> None:
        self.producer = producer
        self.topics = topics
        self.sent = 0

    def __repr__(self) -> str:
        return f"Announcer(topics={self.topics!r})"

    def announce(self, announcement: Announcement, timeout_s: float = 30.0) -> None:
        """Send one announcement (key ``b"latest"``) and flush."""
        self.producer.send(self.topics.index_control, announcement.to_bytes(), key=ANNOUNCE_KEY)
        self.producer.flush(timeout=timeout_s)
        self.sent += 1
        log.info("announced index version %d (%s) on %s", announcement.version, announcement.action,
                 self.topics.index_control)


def latest_announcement(
    settings: KafkaSettings, topics: Topics = Topics(), timeout_s: float = 10.0
) -> Announcement | None:
    """The last announcement on the control topic, or None if there is none.

    Reads without a consumer group (nothing is committed): seeks to the last offset of
    partition 0 and reads that record.
    """
    consumer = make_consumer(settings, None)
    try:
        if not consumer.partitions_for(topics.index_control):
            return None
        tp = TopicPartition(topics.index_control, 0)
        end = consumer.end_offsets([tp])[tp]
        if end <= 0:
            return None
        consumer.assign([tp])
        consumer.seek(tp, end - 1)
        deadline = time.monotonic() + timeout_s
        last: Announcement | None = None
        while time.monotonic() < deadline:
            for record in consumer.poll(timeout_s=0.2):
                if record.value is not None:
                    last = Announcement.from_bytes(record.value)
                if record.offset >= end - 1:
                    return last
        raise IndexerError(
            f"could not read offset {end - 1} of {topics.index_control} within {timeout_s} s; is the broker up?"
        )
    finally:
        consumer.close()
