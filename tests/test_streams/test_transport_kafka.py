"""streams.transport: settings (pure) and a produce -> consume round trip on a real broker."""

from __future__ import annotations

import sys
import time
import uuid
from collections import defaultdict

import pytest

from streams.errors import ConfigError
from streams.events import Event, decode_event, encode_event
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

# A hang fails fast, with the stacks, instead of using up the suite's 600 s.
pytestmark = pytest.mark.timeout(180)


# ------------------------------------------------------------------ settings (no broker)


def test_from_env_reads_all_three_variables() -> None:
    s = KafkaSettings.from_env({
        "KAFKA_BOOTSTRAP_SERVERS": "a:1,b:2",
        "TOWERSTREAM_KAFKA_CLIENT": "confluent",
        "TOWERSTREAM_KAFKA_OPTIONS": '{"security_protocol": "SSL", "ssl_cafile": "/etc/ca.pem"}',
    })
    assert s == KafkaSettings("a:1,b:2", "confluent", {"security_protocol": "SSL", "ssl_cafile": "/etc/ca.pem"})


def test_from_env_defaults_to_kafka_python() -> None:
    assert KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "h:9092"}).client == "kafka-python"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "KAFKA_BOOTSTRAP_SERVERS is not set"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "h:1", "TOWERSTREAM_KAFKA_CLIENT": "librdkafka"}, "is not a Kafka client"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "h:1", "TOWERSTREAM_KAFKA_OPTIONS": "{oops"}, "is not valid JSON"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "h:1", "TOWERSTREAM_KAFKA_OPTIONS": "[1, 2]"}, "must be a JSON object"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "h:1", "TOWERSTREAM_KAFKA_OPTIONS": '{"no_such_option": 1}'},
         "unknown kafka-python option 'no_such_option'"),
    ],
)
def test_from_env_errors_say_what_to_do(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        KafkaSettings.from_env(env)


def test_empty_bootstrap_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bootstrap servers are empty"):
        KafkaSettings("  ")


def test_options_are_translated_for_confluent() -> None:
    from streams.transport import _confluent_options

    opts = _confluent_options({
        "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u",
        "sasl_plain_password": "p", "ssl_cafile": "/ca", "ssl_check_hostname": False,
        "socket.keepalive.enable": True,
    })
    assert opts == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "u",
        "sasl.password": "p", "ssl.ca.location": "/ca", "ssl.endpoint.identification.algorithm": "none",
        "socket.keepalive.enable": True,
    }


def test_kafka_python_options_go_only_to_the_class_that_knows_them() -> None:
    from streams.transport import _kafka_python_options

    opts = {"security_protocol": "SSL", "max_poll_records": 7, "linger_ms": 3}
    assert _kafka_python_options(opts, "consumer") == {"security_protocol": "SSL", "max_poll_records": 7}
    assert _kafka_python_options(opts, "producer") == {"security_protocol": "SSL", "linger_ms": 3}


def test_missing_confluent_kafka_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'towerstream\[confluent\]'"):
        make_producer(KafkaSettings("localhost:1", "confluent"))


def test_bad_confluent_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="rejected the producer configuration"):
        make_producer(KafkaSettings("localhost:1", "confluent", {"no.such.property": 1}))


# ------------------------------------------------------------------ real broker


def _events() -> list[Event]:
    out: list[Event] = []
    for i in range(60):
        user = f"u{i % 7}"
        out.append(Event(kind="request", event_id=f"q{i}", event_time=1e9 + i, user_id=user,
                         request_id=f"r{i}", user_features={"age": "25-34", "score": i * 0.5}, k=10))
        out.append(Event(kind="impression", event_id=f"m{i}", event_time=1e9 + i, user_id=user,
                         request_id=f"r{i}", user_features={"age": "25-34"}, item_id=f"i{i % 11}",
                         item_features={"genres": ("Drama", "War"), "year": 1990 + i}, label=i % 2,
                         position=i % 5))
        if i % 2:
            out.append(Event(kind="click", event_id=f"c{i}", event_time=1e9 + i + 0.5, user_id=user,
                             request_id=f"r{i}", item_id=f"i{i % 11}", label=1, position=i % 5))
    return out


def _consume(consumer, n: int, deadline_s: float = 20.0) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + deadline_s
    while len(got) < n and time.monotonic() < deadline:
        got.extend(consumer.poll(500, 0.5))
    return got


@pytest.mark.kafka
@pytest.mark.parametrize("producer_client", CLIENTS)
@pytest.mark.parametrize("consumer_client", CLIENTS)
def test_round_trip_of_every_event_kind(kafka_bootstrap: str, producer_client: str, consumer_client: str) -> None:
    topic = f"t.roundtrip.{uuid.uuid4().hex[:8]}"
    ensure_topics(KafkaSettings(kafka_bootstrap, producer_client), {topic: 3})
    events = _events()
    producer = make_producer(KafkaSettings(kafka_bootstrap, producer_client))
    for e in events:
        producer.send(topic, encode_event(e), key=key_for_user(e.user_id), headers=[("schema", b"1")])
    producer.flush(30)
    producer.close()

    consumer = make_consumer(KafkaSettings(kafka_bootstrap, consumer_client), f"g-{topic}", [topic])
    try:
        records = _consume(consumer, len(events))
        assert len(records) == len(events)
        assert len(_consume(consumer, 1, deadline_s=1.0)) == 0  # nothing extra
    finally:
        consumer.close()

    decoded = [decode_event(r.value) for r in records]
    assert sorted(decoded, key=lambda e: e.event_id) == sorted(events, key=lambda e: e.event_id)
    assert {e.kind for e in decoded} == {"impression", "click", "request"}
    per_user_sent: dict[str, list[str]] = defaultdict(list)
    for e in events:
        per_user_sent[e.user_id].append(e.event_id)
    per_user_got: dict[str, list[str]] = defaultdict(list)
    partition_of: dict[str, set[int]] = defaultdict(set)
    for r, e in zip(records, decoded):
        assert r.key == key_for_user(e.user_id)
        assert r.topic == topic and r.timestamp > 0
        per_user_got[e.user_id].append(e.event_id)
        partition_of[e.user_id].add(r.partition)
    assert per_user_got == per_user_sent  # keyed by user: one partition, in order
    assert all(len(p) == 1 for p in partition_of.values())
    ends = end_offsets(KafkaSettings(kafka_bootstrap, consumer_client), [topic])
    assert sum(ends.values()) == len(events)


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_commit_then_resume_in_the_same_group(kafka_bootstrap: str, client: str) -> None:
    settings = KafkaSettings(kafka_bootstrap, client)
    topic = f"t.resume.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {topic: 1})
    producer = make_producer(settings)
    for i in range(100):
        producer.send(topic, f"v{i}".encode())
    producer.flush(30)
    producer.close()

    group = f"g-{topic}"
    first = make_consumer(settings, group, [topic], max_poll_records=40)
    records = _consume(first, 1)
    cut = records[min(len(records), 30) - 1].offset + 1
    first.commit({TopicPartition(topic, 0): cut})
    assert first.committed([TopicPartition(topic, 0)]) == {TopicPartition(topic, 0): cut}
    first.close()

    second = make_consumer(settings, group, [topic])
    try:
        rest = _consume(second, 100 - cut)
    finally:
        second.close()
    assert [r.value for r in rest] == [f"v{i}".encode() for i in range(cut, 100)]


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_assign_in_a_group_starts_at_its_commit_or_the_beginning(kafka_bootstrap: str, client: str) -> None:
    """assign() with a group id (a distributed rank's static partitions): a group that
    committed resumes there, a fresh one reads from offset 0. On confluent-kafka the
    committed offsets are asked for explicitly: left to librdkafka, a fresh group's first
    fetch of them can fail with NOT_COORDINATOR and the partition never starts."""
    settings = KafkaSettings(kafka_bootstrap, client)
    topic = f"t.gassign.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {topic: 2})
    producer = make_producer(settings)
    for i in range(40):
        producer.send(topic, f"v{i}".encode(), key=b"k" if i % 2 else b"other")
    producer.flush(30)
    producer.close()
    ends = end_offsets(settings, [topic])
    tps = sorted(ends)

    fresh = make_consumer(settings, f"g-fresh-{topic}")
    try:
        fresh.assign(tps)
        got = _consume(fresh, 40)
        assert sorted((r.partition, r.offset) for r in got) == sorted(
            (tp.partition, off) for tp in tps for off in range(ends[tp]))
    finally:
        fresh.close()

    group = f"g-done-{topic}"
    full, other = sorted(tps, key=lambda tp: -ends[tp])  # commit where there are records past 3
    assert ends[full] > 3
    committer = make_consumer(settings, group)
    committer.commit({full: 3})
    committer.close()
    resumed = make_consumer(settings, group)
    try:
        resumed.assign(tps)
        got = _consume(resumed, 40 - 3)
        # the committed partition from its commit; the other (no commit) from the beginning
        assert sorted((r.partition, r.offset) for r in got) == sorted(
            [(full.partition, off) for off in range(3, ends[full])]
            + [(other.partition, off) for off in range(ends[other])])
    finally:
        resumed.close()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_assign_in_a_fresh_group_on_a_fresh_cluster_starts_fetching(local_broker_config) -> None:  # type: ignore[no-untyped-def]
    """The hang a distributed rank on confluent-kafka met: a just-started cluster answers a
    new group's committed-offsets fetch with NOT_COORDINATOR once, and librdkafka's own
    lookup (assign() without offsets) then never starts the partition. Measured before
    the fix: no record in 40 s; after: every record."""
    from streams.broker import LocalBroker

    with LocalBroker(local_broker_config) as broker:
        writer = KafkaSettings(broker.bootstrap, "kafka-python")  # as the rank's stream was written
        topic = f"t.fresh.{uuid.uuid4().hex[:8]}"
        ensure_topics(writer, {topic: 2})
        producer = make_producer(writer)
        for i in range(20):
            producer.send(topic, f"v{i}".encode(), key=str(i).encode())
        producer.flush(30)
        producer.close()
        consumer = make_consumer(KafkaSettings(broker.bootstrap, "confluent"), f"g-{topic}")
        try:
            consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for(topic)])
            got = _consume(consumer, 20, deadline_s=40.0)
        finally:
            consumer.close()
    assert sorted(r.value for r in got) == sorted(f"v{i}".encode() for i in range(20))


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_assign_seek_position_and_rebalance_callbacks(kafka_bootstrap: str, client: str) -> None:
    settings = KafkaSettings(kafka_bootstrap, client)
    topic = f"t.seek.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {topic: 2})
    producer = make_producer(settings)
    for i in range(50):
        producer.send(topic, f"v{i}".encode(), key=b"same")  # one key: one partition
    producer.flush(30)
    producer.close()
    ends = end_offsets(settings, [topic])
    (tp,) = [tp for tp, end in ends.items() if end == 50]

    manual = make_consumer(settings, None)
    try:
        assert manual.partitions_for(topic) == [0, 1]
        manual.assign([tp])
        manual.seek(tp, 45)
        got = _consume(manual, 5)
        assert [r.offset for r in got] == [45, 46, 47, 48, 49]
        assert manual.position(tp) == 50
    finally:
        manual.close()

    # In a group, a seek inside on_assigned chooses where the partition starts.
    calls: list[tuple[str, list[TopicPartition]]] = []
    group_consumer = make_consumer(settings, f"g-{topic}")

    def assigned(tps: list[TopicPartition]) -> None:
        calls.append(("assigned", tps))
        group_consumer.seek(tp, 40)

    group_consumer.subscribe([topic], on_assigned=assigned,
                             on_revoked=lambda tps: calls.append(("revoked", tps)))
    try:
        got = _consume(group_consumer, 10)
        assert [r.offset for r in got] == list(range(40, 50))
    finally:
        group_consumer.close()
    assert calls[0] == ("assigned", [TopicPartition(topic, 0), TopicPartition(topic, 1)])


@pytest.mark.kafka
def test_ensure_topics_is_idempotent(kafka_bootstrap: str) -> None:
    topic = f"t.ensure.{uuid.uuid4().hex[:8]}"
    for client in CLIENTS:
        ensure_topics(KafkaSettings(kafka_bootstrap, client), {topic: 3})
    ends = end_offsets(KafkaSettings(kafka_bootstrap), [topic])
    assert ends == {TopicPartition(topic, p): 0 for p in range(3)}


@pytest.mark.kafka
def test_ensure_topics_leaves_an_existing_topic_as_it_is(kafka_bootstrap: str) -> None:
    topic = f"t.exists.{uuid.uuid4().hex[:8]}"
    ensure_topics(KafkaSettings(kafka_bootstrap), {topic: 2})
    for client in CLIENTS:  # asking for more partitions neither fails nor waits for them
        ensure_topics(KafkaSettings(kafka_bootstrap, client), {topic: 4}, timeout_s=5)
    assert sorted(end_offsets(KafkaSettings(kafka_bootstrap), [topic])) == [TopicPartition(topic, 0),
                                                                            TopicPartition(topic, 1)]


@pytest.mark.kafka
def test_blocking_calls_inside_a_kafka_python_callback_fail_clearly(kafka_bootstrap: str) -> None:
    from streams.transport import KafkaTransportError

    settings = KafkaSettings(kafka_bootstrap)
    topic = f"t.cb.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {topic: 1})
    consumer = make_consumer(settings, f"g-{topic}")
    consumer.subscribe([topic], on_assigned=lambda tps: consumer.end_offsets(tps))
    try:
        with pytest.raises(KafkaTransportError) as info:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                consumer.poll(10, 0.2)
        chain = []
        exc: BaseException | None = info.value
        while exc is not None:
            chain.append(str(exc))
            exc = exc.__cause__
        assert any("call it after poll() returns" in text for text in chain), chain
    finally:
        consumer.close()
