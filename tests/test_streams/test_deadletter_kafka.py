"""Dead-lettering and the event consumer: bad records are kept with their reason, good
ones all arrive, offsets are committed only after handling, and a consumer killed
mid-stream loses nothing."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from streams.consumer import EventBatch, EventConsumer, open_event_consumer
from streams.deadletter import DeadLetterWriter, decode_dead_letter
from streams.events import Event, encode_event
from streams.topics import key_for_user
from streams.transport import (
    KafkaSettings,
    Record,
    TopicPartition,
    end_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
)

CLIENTS = ["kafka-python", "confluent"]
REPO = Path(__file__).resolve().parents[2]
PROC = Path(__file__).with_name("_consumer_proc.py")

# A hang fails fast, with the stacks, instead of using up the suite's 600 s.
pytestmark = pytest.mark.timeout(180)


def _impression(i: int) -> Event:
    return Event(kind="impression", event_id=f"e{i}", event_time=1.6e9 + i, user_id=f"u{i % 13}",
                 request_id=f"r{i}", user_features={"age": "18-24"}, item_id=f"i{i % 17}",
                 item_features={"genres": ("Comedy",)}, label=int(i % 3 == 0), position=i % 4)


def _good(i: int) -> dict:
    return orjson.loads(encode_event(_impression(i)))


# Each bad record: (raw value, expected reason). Built from a good record so exactly one
# thing is wrong with it.
def _bad_records() -> list[tuple[bytes, str]]:
    wrong_version = {**_good(900), "schema_version": 2}
    missing = {k: v for k, v in _good(901).items() if k != "user_id"}
    no_version = {k: v for k, v in _good(902).items() if k != "schema_version"}
    wrong_type = {**_good(903), "event_time": "yesterday"}
    wrong_label_type = {**_good(904), "label": "yes"}
    unknown = {**_good(905), "colour": "blue"}
    bad_value = {**_good(906), "kind": "purchase"}
    return [
        (b'{"schema_version": 1, "kind": "impression", ', "json"),
        (b"\xff\xfe not utf-8", "json"),
        (orjson.dumps(wrong_version), "schema_version"),
        (orjson.dumps(missing), "missing_field"),
        (orjson.dumps(no_version), "missing_field"),
        (orjson.dumps(wrong_type), "type"),
        (orjson.dumps(wrong_label_type), "type"),
        (b"[1, 2, 3]", "type"),
        (orjson.dumps(unknown), "unknown_field"),
        (orjson.dumps(bad_value), "value"),
    ]


class _FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.flushes = 0

    def send(self, topic, value, key=None, headers=None) -> None:
        self.sent.append((topic, value, key))

    def flush(self, timeout=None) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass


def test_writer_keeps_original_bytes_key_and_reason() -> None:
    producer = _FakeProducer()
    writer = DeadLetterWriter(producer, "dlq", "g1", clock=lambda: 123.0)
    writer.write(Record("events", 3, 77, b"u9", b"\x00\x01 raw", 1700000000123), "json", "not valid JSON")
    writer.write(Record("events", 1, 5, None, b"{}", -1), "missing_field", "missing field(s) kind")
    assert writer.counts == Counter({"json": 1, "missing_field": 1})
    writer.flush()
    writer.flush()  # nothing pending: no second round trip
    assert producer.flushes == 1
    (topic, value, key), (_, value2, key2) = producer.sent
    assert (topic, key, key2) == ("dlq", b"u9", None)
    dl = decode_dead_letter(value)
    assert (dl.topic, dl.partition, dl.offset, dl.timestamp_ms) == ("events", 3, 77, 1700000000123)
    assert (dl.original_key, dl.original_value) == (b"u9", b"\x00\x01 raw")
    assert (dl.reason, dl.message, dl.group_id, dl.dead_lettered_at) == ("json", "not valid JSON", "g1", 123.0)
    assert orjson.loads(value)["value_b64"] == base64.b64encode(b"\x00\x01 raw").decode()
    assert decode_dead_letter(value2).original_key is None


class _ListConsumer:
    """Unit-test stand-in: hands out fixed records once."""

    group_id = "g"

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.commits: list[dict] = []

    def poll(self, max_records=500, timeout_s=1.0):
        out, self.records = self.records[:max_records], self.records[max_records:]
        return out

    def commit(self, offsets) -> None:
        self.commits.append(dict(offsets))

    def assignment(self):
        return frozenset({TopicPartition("t", 0)})

    def close(self) -> None:
        pass


def test_duplicates_below_the_floor_are_skipped_and_still_committed() -> None:
    records = [Record("t", 0, i, b"k", encode_event(_impression(i)), 0) for i in range(10)]
    consumer = _ListConsumer(records + records[3:6])  # offsets 3..5 delivered twice
    ec = EventConsumer(consumer, DeadLetterWriter(_FakeProducer(), "dlq", "g"), batch_size=4)
    ec.skip_below({TopicPartition("t", 0): 2})
    seen: list[str] = []
    ec.run(lambda b: seen.extend(e.event_id for e in b.events), idle_timeout_s=0)
    assert seen == [f"e{i}" for i in range(2, 10)]
    assert ec.counts.duplicates == 2 + 3
    assert consumer.commits[-1] == {TopicPartition("t", 0): 10}  # never moved back by the replay


def test_max_events_leaves_the_rest_for_later_and_commits_only_what_was_handled() -> None:
    records = [Record("t", 0, i, b"k", encode_event(_impression(i)), 0) for i in range(10)]
    consumer = _ListConsumer(records)
    ec = EventConsumer(consumer, DeadLetterWriter(_FakeProducer(), "dlq", "g"), batch_size=8)
    seen: list[str] = []
    ec.run(lambda b: seen.extend(e.event_id for e in b.events), max_events=5)
    assert seen == [f"e{i}" for i in range(5)]
    assert consumer.commits == [{TopicPartition("t", 0): 5}]
    batch = ec.poll_batch()
    assert [e.event_id for e in batch.events] == ["e5", "e6", "e7"]  # the buffered rest of the poll


# ------------------------------------------------------------------ real broker


def _produce_mixed(settings: KafkaSettings, topic: str, n_good: int) -> tuple[list[str], list[tuple[bytes, str]]]:
    """Good impressions with the bad records spread between them; the last record is good."""
    bad = _bad_records()
    producer = make_producer(settings)
    good_ids: list[str] = []
    every = max(1, n_good // (len(bad) + 1))
    j = 0
    for i in range(n_good):
        event = _impression(i)
        producer.send(topic, encode_event(event), key=key_for_user(event.user_id))
        good_ids.append(event.event_id)
        if i % every == every - 1 and j < len(bad):
            producer.send(topic, bad[j][0], key=f"bad{j}".encode())
            j += 1
    assert j == len(bad)
    producer.flush(30)
    producer.close()
    return good_ids, bad


def _read_all(settings: KafkaSettings, topic: str, n: int, deadline_s: float = 20.0) -> list[Record]:
    consumer = make_consumer(settings, None)
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for(topic)])
        got: list[Record] = []
        deadline = time.monotonic() + deadline_s
        while len(got) < n and time.monotonic() < deadline:
            got.extend(consumer.poll(500, 0.3))
        return got
    finally:
        consumer.close()


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_bad_records_go_to_the_dead_letter_topic_with_their_reason(kafka_bootstrap: str, client: str) -> None:
    settings = KafkaSettings(kafka_bootstrap, client)
    uid = uuid.uuid4().hex[:8]
    topic, dlq, group = f"t.dl.{uid}", f"t.dl.{uid}.dead-letter", f"g-dl-{uid}"
    ensure_topics(settings, {topic: 3, dlq: 1})
    good_ids, bad = _produce_mixed(settings, topic, n_good=400)

    ec = open_event_consumer(settings, group, [topic], dlq, batch_size=64, poll_timeout_s=0.2)
    seen: list[str] = []
    try:
        counts = ec.run(lambda b: seen.extend(e.event_id for e in b.events), max_events=len(good_ids),
                        idle_timeout_s=15)
        # every record is handled: the committed offsets are the end offsets
        ends = end_offsets(settings, [topic])
        assert ec.consumer.committed(list(ends)) == ends
    finally:
        ec.close()
    assert sorted(seen) == sorted(good_ids) and len(seen) == len(good_ids)
    assert counts.dead_lettered == len(bad)

    dead = [decode_dead_letter(r.value) for r in _read_all(settings, dlq, len(bad))]
    assert len(dead) == len(bad)
    assert len(_read_all(settings, dlq, len(bad) + 1, deadline_s=1.0)) == len(bad)  # no extra
    by_value = {d.original_value: d for d in dead}
    for raw, reason in bad:
        d = by_value[raw]
        assert d.reason == reason, (raw, d.message)
        assert d.group_id == group and d.topic == topic and d.message
    # The original coordinates point at the original record.
    originals = {(r.partition, r.offset): r for r in _read_all(settings, topic, len(good_ids) + len(bad))}
    for d in dead:
        original = originals[(d.partition, d.offset)]
        assert original.value == d.original_value and original.key == d.original_key
        assert original.timestamp == d.timestamp_ms


@pytest.mark.kafka
def test_a_failing_handler_commits_nothing_and_the_batch_comes_back(kafka_bootstrap: str) -> None:
    settings = KafkaSettings(kafka_bootstrap)
    uid = uuid.uuid4().hex[:8]
    topic, dlq, group = f"t.fail.{uid}", f"t.fail.{uid}.dl", f"g-fail-{uid}"
    ensure_topics(settings, {topic: 1, dlq: 1})
    producer = make_producer(settings)
    for i in range(30):
        producer.send(topic, encode_event(_impression(i)))
    producer.flush(30)
    producer.close()

    def boom(batch: EventBatch) -> None:
        raise RuntimeError("handler failed")

    ec = open_event_consumer(settings, group, [topic], dlq, batch_size=10)
    with pytest.raises(RuntimeError, match="handler failed"):
        ec.run(boom, idle_timeout_s=15)
    assert ec.consumer.committed([TopicPartition(topic, 0)]) == {TopicPartition(topic, 0): None}
    ec.close()

    ec = open_event_consumer(settings, group, [topic], dlq, batch_size=10)
    seen: list[str] = []
    try:
        ec.run(lambda b: seen.extend(e.event_id for e in b.events), max_events=30, idle_timeout_s=15)
    finally:
        ec.close()
    assert seen == [f"e{i}" for i in range(30)]


def _start_proc(bootstrap: str, client: str, group: str, topic: str, dlq: str, out: Path,
                *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(PROC), "--bootstrap", bootstrap, "--client", client, "--group", group,
         "--topic", topic, "--dead-letter-topic", dlq, "--out", str(out), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_sigkill_mid_stream_then_restart_loses_nothing(kafka_bootstrap: str, client: str, tmp_path: Path) -> None:
    settings = KafkaSettings(kafka_bootstrap, client)
    uid = uuid.uuid4().hex[:8]
    topic, dlq, group = f"t.kill.{uid}", f"t.kill.{uid}.dl", f"g-kill-{uid}"
    ensure_topics(settings, {topic: 3, dlq: 1})
    good_ids, bad = _produce_mixed(settings, topic, n_good=3000)
    out = tmp_path / "ids.txt"

    proc = _start_proc(kafka_bootstrap, client, group, topic, dlq, out, "--batch-size", "50", "--slow-ms", "30")
    deadline = time.monotonic() + 60
    while len(_lines(out)) < 600 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    handled_before = len(_lines(out))
    assert 600 <= handled_before < len(good_ids)  # killed mid-stream

    proc = _start_proc(kafka_bootstrap, client, group, topic, dlq, out, "--batch-size", "200",
                       "--idle-timeout", "2")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    summary = orjson.loads(stdout.strip().splitlines()[-1])

    ids = _lines(out)
    assert set(ids) == set(good_ids)  # none lost
    assert len(ids) - len(good_ids) == sum(c - 1 for c in Counter(ids).values())
    # The restart resumed from the committed offsets: only the one batch in hand at the
    # kill (handled, not yet committed) can come twice, not the whole stream.
    assert len(ids) - len(good_ids) <= 50
    assert summary["events"] < len(good_ids)
    dead = [decode_dead_letter(r.value) for r in _read_all(settings, dlq, len(bad))]
    assert {d.original_value for d in dead} == {raw for raw, _ in bad}  # at least once each
