"""``EventConsumer.poll_columns`` hands over, dead-letters and commits what ``poll_batch`` does."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import orjson

from streams.consumer import EventConsumer
from streams.deadletter import DeadLetterWriter, decode_dead_letter
from streams.events import encode_event
from streams.simulator import ClickSimulator, SimulatorConfig
from streams.transport import Record, TopicPartition

sys.path.insert(0, str(Path(__file__).parent))
from test_deadletter_kafka import _FakeProducer, _ListConsumer  # noqa: E402
from test_decode_batch import _mutants  # noqa: E402


def _records() -> list[Record]:
    good = [encode_event(e) for e in ClickSimulator(SimulatorConfig(seed=8)).events(max_events=600)]
    bad = _mutants(random.Random(4), [orjson.loads(r) for r in good[:100]], 300) + [b"{", b""]
    values = good[:300] + bad + good[300:] + [None]
    rng = random.Random(1)
    rng.shuffle(values)
    return [Record("t", i % 2, i // 2, b"k", v, 0) for i, v in enumerate(values)]


def _drain(poll, ec: EventConsumer, max_events: int | None) -> tuple[list, list]:
    handed, offsets = [], []
    while (batch := poll(max_events=max_events)) is not None:
        events = batch.events if hasattr(batch, "events") else batch.columns.events()
        handed.append(events)
        offsets.append(dict(batch.offsets))
    return handed, offsets


def test_poll_columns_matches_poll_batch_with_dead_letters_duplicates_and_max_events() -> None:
    records = _records()
    runs = []
    for use_columns in (False, True):
        producer = _FakeProducer()
        consumer = _ListConsumer(records + records[40:90])  # a redelivered stretch
        ec = EventConsumer(consumer, DeadLetterWriter(producer, "dlq", "g"), batch_size=128)
        ec.skip_below({TopicPartition("t", 1): 20})
        handed, offsets = _drain(ec.poll_columns if use_columns else ec.poll_batch, ec, max_events=97)
        dead = [(d.partition, d.offset, d.reason, d.message, d.original_value)
                for d in (decode_dead_letter(v) for _, v, _ in producer.sent)]
        runs.append((handed, offsets, dead, vars(ec.counts)))
    (h0, o0, d0, c0), (h1, o1, d1, c1) = runs
    assert h1 == h0 and o1 == o0 and d1 == d0 and c1 == c0
    assert len(d0) > 100 and c0["duplicates"] > 0 and sum(map(len, h0)) > 600
    assert {r for _, _, r, _, _ in d0} >= {"json", "type", "value", "missing_field", "unknown_field"}


def test_poll_columns_carries_each_rows_partition_and_offset() -> None:
    records = _records()
    ec = EventConsumer(_ListConsumer(records), DeadLetterWriter(_FakeProducer(), "dlq", "g"), batch_size=200)
    batch = ec.poll_columns()
    by_place = {(r.partition, r.offset): r.value for r in records}
    for i, event in enumerate(batch.columns.events()):
        raw = by_place[(int(batch.partitions[i]), int(batch.kafka_offsets[i]))]
        assert orjson.loads(raw)["event_id"] == event.event_id
