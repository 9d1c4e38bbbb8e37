"""Dead-lettering: a record that fails to decode or validate is kept, not dropped.

A bad record goes to ``Topics.dead_letter`` as a JSON object that carries everything
needed to look at it, fix it and replay it:

``value_b64`` / ``key_b64``
    The original bytes, base64 (``null`` when the record had none).
``topic``, ``partition``, ``offset``, ``timestamp_ms``
    Where the record came from.
``reason``, ``message``
    The :class:`~streams.errors.EventValidationError` reason code (``json``,
    ``schema_version``, ``missing_field``, ``type``, ``value``, ``unknown_field``) and
    its explanation.
``group_id``, ``dead_lettered_at``
    The consumer group that rejected it and when (seconds since the epoch).

The dead-letter record is keyed by the original key, so a user's bad records stay in
order.

>>> from streams.transport import Record
>>> rec = Record("towerstream.events", 2, 41, b"u1", b"{not json", 1700000000000)
>>> raw = dead_letter_value(rec, "json", "not valid JSON", group_id="learner-ctr", now=1700000001.0)
>>> dl = decode_dead_letter(raw)
>>> dl.reason, dl.partition, dl.offset, dl.original_value
('json', 2, 41, b'{not json')
"""

from __future__ import annotations

import base64
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import orjson

from streams.errors import StreamsError
from streams.transport import Producer, Record

__all__ = ["DEAD_LETTER_VERSION", "DeadLetter", "DeadLetterWriter", "dead_letter_value", "decode_dead_letter"]

log = logging.getLogger(__name__)

DEAD_LETTER_VERSION = 1


@dataclass(frozen=True)
class DeadLetter:
    """One decoded dead-letter record (see the module docstring for the fields)."""

    reason: str
    message: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    original_key: bytes | None
    original_value: bytes | None
    group_id: str | None
    dead_lettered_at: float
    version: int = DEAD_LETTER_VERSION


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def dead_letter_value(record: Record, reason: str, message: str, *, group_id: str | None, now: float) -> bytes:
    """The JSON value of the dead-letter record for ``record``."""
    return orjson.dumps({
        "dead_letter_version": DEAD_LETTER_VERSION,
        "reason": reason,
        "message": message,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "key_b64": _b64(record.key),
        "value_b64": _b64(record.value),
        "group_id": group_id,
        "dead_lettered_at": now,
    })


def decode_dead_letter(raw: bytes) -> DeadLetter:
    """Parse a dead-letter record value (for tools and tests)."""
    try:
        obj: Mapping[str, Any] = orjson.loads(raw)
        return DeadLetter(
            reason=obj["reason"], message=obj["message"], topic=obj["topic"], partition=obj["partition"],
            offset=obj["offset"], timestamp_ms=obj["timestamp_ms"],
            original_key=None if obj["key_b64"] is None else base64.b64decode(obj["key_b64"]),
            original_value=None if obj["value_b64"] is None else base64.b64decode(obj["value_b64"]),
            group_id=obj["group_id"], dead_lettered_at=obj["dead_lettered_at"],
            version=obj["dead_letter_version"],
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StreamsError(f"not a towerstream dead-letter record: {exc!r}") from None


class DeadLetterWriter:
    """Sends bad records to the dead-letter topic; :meth:`flush` makes them durable.

    Parameters
    ----------
    producer
        Any :class:`~streams.transport.Producer`.
    topic
        The dead-letter topic (``Topics.dead_letter``).
    group_id
        Written into each record: which consumer rejected it.
    clock
        Wall clock for ``dead_lettered_at`` (seconds since the epoch).
    """

    def __init__(self, producer: Producer, topic: str, group_id: str | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.producer = producer
        self.topic = topic
        self.group_id = group_id
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._pending = 0

    @property
    def total(self) -> int:
        """Records dead-lettered by this writer so far."""
        return sum(self.counts.values())

    def write(self, record: Record, reason: str, message: str) -> None:
        """Queue one dead letter (delivered for sure only after :meth:`flush`)."""
        log.warning("dead-lettering %s[%d]@%d (%s): %s", record.topic, record.partition, record.offset,
                    reason, message)
        value = dead_letter_value(record, reason, message, group_id=self.group_id, now=self.clock())
        self.producer.send(self.topic, value, key=record.key)
        self.counts[reason] += 1
        self._pending += 1

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every queued dead letter is acknowledged; raises
        :class:`~streams.transport.KafkaTransportError` if one was not."""
        if self._pending:
            self.producer.flush(timeout)
            self._pending = 0
