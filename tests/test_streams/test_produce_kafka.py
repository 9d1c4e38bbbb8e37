"""Producing the click stream: routing and pacing (unit), and a round trip through real Kafka."""

from __future__ import annotations

import argparse
import time
import uuid
from collections import Counter

import pytest

from streams._produce_cli import produce_events, register
from streams.errors import ConfigError
from streams.events import decode_event, encode_event
from streams.simulator import ClickSimulator, SimulatorConfig
from streams.topics import Topics, key_for_user

SIM = SimulatorConfig(seed=5, n_users=200, n_items=100, slate_size=5)


class ListSink:
    """In-memory stand-in for a producer: remembers what was sent and flushes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.flushes = 0

    def send(self, topic, value, key=None, headers=None):
        self.sent.append((topic, value, key))

    def flush(self, timeout=None):
        self.flushes += 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


def test_routing_keys_and_counts():
    events = list(ClickSimulator(SIM).events(max_events=500))
    sink = ListSink()
    counts = produce_events(sink, Topics("t1"), events)
    assert counts == Counter(e.kind for e in events)
    assert sink.flushes == 1
    assert len(sink.sent) == 500
    for event, (topic, value, key) in zip(events, sink.sent):
        assert topic == ("t1.requests" if event.kind == "request" else "t1.events")
        assert key == key_for_user(event.user_id)
        assert decode_event(value) == event


def test_item_events_go_to_the_items_topic_and_requests_to_their_own_producer():
    from streams._produce_cli import _with_arrivals
    from streams.items import decode_item_event, key_for_item

    sim = ClickSimulator(SimulatorConfig(seed=5, n_users=200, n_items=100, slate_size=5, new_item_rate=0.01))
    initial = sim.n_items
    sink, req_sink = ListSink(), ListSink()
    counts = produce_events(sink, Topics("t1"), _with_arrivals(sim, sim.events(max_events=3000)),
                            requests_producer=req_sink)
    arrived = sim.item_ids()[initial:]
    items = [(decode_item_event(v), k) for t, v, k in sink.sent if t == "t1.items"]
    assert arrived and [e.item_id for e, _ in items] == arrived  # each arrival announced once, in order
    assert all(e.op == "upsert" and k == key_for_item(e.item_id) and e.features == sim.item_features(e.item_id)
               for e, k in items)
    assert counts["item"] == len(arrived)
    assert {t for t, _, _ in req_sink.sent} == {"t1.requests"} and len(req_sink.sent) == counts["request"]
    assert {t for t, _, _ in sink.sent} == {"t1.events", "t1.items"} and req_sink.flushes == 1
    # an item is announced before any event that shows it
    first_shown = {}
    for n, (t, v, _) in enumerate(sink.sent):
        if t == "t1.events":
            first_shown.setdefault(decode_event(v).item_id, n)
    announced = {decode_item_event(v).item_id: n for n, (t, v, _) in enumerate(sink.sent) if t == "t1.items"}
    assert all(announced[i] < first_shown[i] for i in announced if i in first_shown)


def test_rate_paces_in_wall_clock_time():
    clock = FakeClock()
    events = ClickSimulator(SIM).events(max_events=201)
    produce_events(ListSink(), Topics(), events, rate=100.0, clock=clock, sleep=clock.sleep)
    # Event n may go out at n / rate seconds: the 201st at 2.0 s.
    assert clock.slept == pytest.approx(2.0, abs=0.01)


def test_duration_stops_the_stream():
    clock = FakeClock()
    counts = produce_events(ListSink(), Topics(), ClickSimulator(SIM).events(), rate=50.0, duration=3.0,
                            clock=clock, sleep=clock.sleep)
    assert sum(counts.values()) == 150


def test_progress_is_reported():
    seen = []
    produce_events(ListSink(), Topics(), ClickSimulator(SIM).events(max_events=50),
                   progress=lambda c, t: seen.append(sum(c.values())), progress_every_s=0.0)
    assert seen and seen[-1] == 50


def test_invalid_rate():
    with pytest.raises(ConfigError, match="rate"):
        produce_events(ListSink(), Topics(), [], rate=-1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="towerstream")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    return parser


def test_cli_rejects_bad_arguments_before_connecting(tmp_path):
    parser = _parser()
    args = parser.parse_args(["produce", "replay", "--bootstrap-servers", "nowhere:1"])
    with pytest.raises(ConfigError, match="--path"):
        args.func(args)
    args = parser.parse_args(["produce", "simulate", "--rate", "-5", "--bootstrap-servers", "nowhere:1"])
    with pytest.raises(ConfigError, match="--rate"):
        args.func(args)
    args = parser.parse_args(["produce", "replay", "--path", str(tmp_path), "--bootstrap-servers", "nowhere:1"])
    with pytest.raises(ConfigError, match="u.data"):
        args.func(args)


# --------------------------------------------------------------------------- real Kafka


def _consume_all(bootstrap: str, topics: Topics, expected_total: int, timeout_s: float = 60.0):
    from streams.transport import KafkaSettings, TopicPartition, make_consumer

    consumer = make_consumer(KafkaSettings(bootstrap), None)
    try:
        consumer.assign([TopicPartition(t, p) for t in (topics.requests, topics.events)
                         for p in consumer.partitions_for(t)])
        records = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected_total and time.monotonic() < deadline:
            records.extend(consumer.poll(max_records=5000, timeout_s=0.5))
        records.extend(consumer.poll(max_records=5000, timeout_s=1.0))  # anything beyond the expected?
        return records
    finally:
        consumer.close()


def _delete_topics(bootstrap: str, topics: Topics) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([topics.requests, topics.events])
    except Exception:  # noqa: BLE001 - cleanup only; the broker is per-session anyway
        pass
    finally:
        admin.close()


def _check_round_trip(records, events, topics: Topics) -> None:
    expected = Counter(e.kind for e in events)
    got = Counter()
    by_id = {e.event_id: e for e in events}
    seen = set()
    for r in records:
        e = decode_event(r.value)
        got[e.kind] += 1
        assert r.topic == (topics.requests if e.kind == "request" else topics.events)
        assert r.key == key_for_user(e.user_id)
        assert encode_event(by_id[e.event_id]) == r.value
        seen.add(e.event_id)
    assert got == expected
    assert seen == set(by_id)


@pytest.mark.kafka
def test_simulated_events_round_trip_through_kafka(kafka_bootstrap):
    from streams.transport import KafkaSettings, ensure_topics, make_producer

    topics = Topics(f"test-produce-{uuid.uuid4().hex[:8]}")
    settings = KafkaSettings(kafka_bootstrap)
    ensure_topics(settings, {topics.requests: 2, topics.events: 3})
    events = list(ClickSimulator(SIM).events(max_events=3_000))
    producer = make_producer(settings)
    try:
        sent = produce_events(producer, topics, events)
    finally:
        producer.close()
    assert sent == Counter(e.kind for e in events)
    try:
        _check_round_trip(_consume_all(kafka_bootstrap, topics, len(events)), events, topics)
    finally:
        _delete_topics(kafka_bootstrap, topics)


@pytest.mark.kafka
def test_cli_simulate_produces_to_kafka(kafka_bootstrap, capsys):
    prefix = f"test-cli-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    args = _parser().parse_args([
        "produce", "simulate", "--bootstrap-servers", kafka_bootstrap, "--topic-prefix", prefix,
        "--events", "800", "--seed", "5", "--n-users", "200", "--n-items", "100", "--slate-size", "5",
    ])
    try:
        assert args.func(args) == 0
        events = list(ClickSimulator(SIM).events(max_events=800))
        expected = Counter(e.kind for e in events)
        out = capsys.readouterr().out
        for kind in ("request", "impression", "click"):
            assert f"{kind}: {expected[kind]}" in out
        _check_round_trip(_consume_all(kafka_bootstrap, topics, 800), events, topics)
    finally:
        _delete_topics(kafka_bootstrap, topics)
