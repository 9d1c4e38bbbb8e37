"""The request loop's logic with in-memory Kafka fakes (the real-broker test is test_e2e_kafka)."""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from indexer.handle import IndexHolder
from serving.metrics import Metrics
from serving.online_eval import OnlineEvalConfig, OnlineEvaluator
from serving.request_consumer import EventsFollower, RequestConsumer
from serving.scorer import ItemFeatureStore, ModelHandle, Scorer
from streams.consumer import EventConsumer
from streams.deadletter import DeadLetterWriter, decode_dead_letter
from streams.events import Event, encode_event
from streams.topics import Topics
from streams.transport import KafkaTransportError, Record, TopicPartition

T = Topics(prefix="t")


class FakeConsumer:
    """transport.Consumer over a list of records; logs commits into a shared journal."""

    def __init__(self, records: list[Record], journal: list[Any]) -> None:
        self.records = list(records)
        self.journal = journal
        self.group_id = "g"
        self.committed_offsets: dict[TopicPartition, int] = {}

    def subscribe(self, topics: Sequence[str], **kw: Any) -> None:
        pass

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset({TopicPartition(r.topic, r.partition) for r in self.records}
                         | set(self.committed_offsets))

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        out, self.records = self.records[:max_records], self.records[max_records:]
        if not out:
            time.sleep(0.01)
        return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.journal.append(("commit", dict(offsets)))
        self.committed_offsets.update(offsets)

    def end_offsets(self, partitions: Iterable[TopicPartition], *, cached: bool = False) -> dict[TopicPartition, int]:
        return {tp: 10 for tp in partitions}

    def position(self, tp: TopicPartition) -> int | None:
        return 0

    def close(self) -> None:
        pass


class FakeProducer:
    def __init__(self, journal: list[Any], fail: bool = False) -> None:
        self.journal = journal
        self.fail = fail
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> None:
        self.sent.append((topic, value, key))
        self.journal.append(("send", topic))

    def flush(self, timeout: float | None = None) -> None:
        self.journal.append(("flush",))
        if self.fail:
            raise KafkaTransportError("1 record not delivered")

    def close(self) -> None:
        pass


def request(n: int, user: str = "u1", k: int = 2) -> Event:
    return Event(kind="request", event_id=f"e{n}", event_time=float(n), user_id=user, request_id=f"r{n}", k=k)


def rec(offset: int, value: bytes, topic: str = T.requests, timestamp_ms: int = 0) -> Record:
    return Record(topic, 0, offset, b"u1", value, timestamp_ms)


class Source:
    def __init__(self, handle: ModelHandle | None) -> None:
        self.handle = handle

    def current(self) -> ModelHandle | None:
        return self.handle


def build(fakes: Any, records: list[Record], *, ready: bool = True, fail: bool = False,
          evaluator: OnlineEvaluator | None = None,
          wall_clock: Any = time.time) -> tuple[RequestConsumer, list[Any], Any, CollectorRegistry]:
    journal: list[Any] = []
    producer = FakeProducer(journal, fail=fail)
    ec = EventConsumer(FakeConsumer(records, journal), DeadLetterWriter(producer, T.dead_letter, "g"),
                       batch_size=100, poll_timeout_s=0.01)
    model = ModelHandle(fakes.FakeTwoTower(prerank={"i0": 0.2, "i1": 0.8}), "fake", 11)
    holder = IndexHolder(fakes.flat_handle(4, ["i0", "i1", "i2"], np.eye(4, dtype=np.float32)[:3]) if ready else None)
    reg = CollectorRegistry()
    metrics = Metrics(registry=reg)
    scorer = Scorer(Source(model), holder, k_retrieve=3, metrics=metrics)
    loop = RequestConsumer(ec, producer, scorer, topics=T, metrics=metrics, evaluator=evaluator,
                           score_batch=2, not_ready_backoff_s=0.01, group_id="g", wall_clock=wall_clock)
    return loop, journal, producer, reg


def test_every_request_gets_a_ranking_before_the_commit(fakes: Any) -> None:
    ev = OnlineEvaluator(OnlineEvalConfig())
    loop, journal, producer, reg = build(fakes, [rec(n, encode_event(request(n))) for n in range(5)], evaluator=ev)
    stats = loop.run(idle_timeout_s=0.05)
    rankings = [(t, orjson.loads(v), k) for t, v, k in producer.sent if t == T.rankings]
    assert [r["request_id"] for _, r, _ in rankings] == [f"r{n}" for n in range(5)]
    assert all(k == r["request_id"].encode() for _, r, k in rankings)  # keyed by request id
    first = rankings[0][1]
    assert [i["item_id"] for i in first["items"]] == ["i1", "i0"]
    assert (first["index_version"], first["model_version"], first["learner"]) == (4, 11, "fake")
    # Sends, then one flush, then the commit of all five offsets.
    assert journal[-2:] == [("flush",), ("commit", {TopicPartition(T.requests, 0): 5})]
    assert stats.produced == 5
    assert reg.get_sample_value("towerstream_requests_total", {"source": "kafka", "outcome": "ok"}) == 5
    assert reg.get_sample_value("towerstream_rankings_produced_total") == 5
    assert reg.get_sample_value("towerstream_events_consumed_total", {"topic": T.requests}) == 5
    assert reg.get_sample_value("towerstream_consumer_lag_records", {"topic": T.requests, "group": "g"}) == 5
    assert ev.stats()["served_remembered"] == 5


def test_queue_and_end_to_end_stages_run_from_the_record_timestamp(fakes: Any) -> None:
    # Four requests in one poll, scored two at a time; the wall clock is read when the poll
    # returned, at each chunk's scoring start and after its rankings were handed to the
    # producer. The third record has no timestamp (-1).
    stamps = [1_000_000, 1_000_100, -1, 1_000_200]  # ms since the epoch
    records = [rec(n, encode_event(request(n)), timestamp_ms=t) for n, t in enumerate(stamps)]
    ticks = iter([1000.21, 1000.25, 1000.30, 1000.50, 1000.60])
    loop, _, _, reg = build(fakes, records, wall_clock=lambda: next(ticks))
    loop.run(idle_timeout_s=0.05)

    def stage(name: str, suffix: str) -> float | None:
        return reg.get_sample_value(f"towerstream_score_latency_seconds_{suffix}", {"stage": name})

    assert stage("fetch", "count") == 3  # the record without a timestamp is left out
    assert stage("fetch", "sum") == pytest.approx(0.21 + 0.11 + 0.01)
    assert stage("queue", "count") == 3
    assert stage("queue", "sum") == pytest.approx(0.25 + 0.15 + 0.30)
    assert stage("end_to_end", "count") == 3
    assert stage("end_to_end", "sum") == pytest.approx(0.30 + 0.20 + 0.40)
    assert stage("total", "count") == 4  # the scorer's own stages count every request


def test_bad_records_are_dead_lettered_with_their_reason(fakes: Any) -> None:
    click = Event(kind="click", event_id="c", event_time=1.0, user_id="u1", request_id="r", item_id="i1", label=1)
    records = [rec(0, b"{not json"), rec(1, encode_event(click)), rec(2, encode_event(request(2))),
               rec(3, b'{"schema_version": 9}')]
    loop, journal, producer, reg = build(fakes, records)
    loop.run(idle_timeout_s=0.05)
    dead = [decode_dead_letter(v) for t, v, _ in producer.sent if t == T.dead_letter]
    assert sorted((d.offset, d.reason) for d in dead) == [(0, "json"), (1, "kind"), (3, "schema_version")]
    assert "only request events belong there" in next(d.message for d in dead if d.reason == "kind")
    assert [orjson.loads(v)["request_id"] for t, v, _ in producer.sent if t == T.rankings] == ["r2"]
    assert journal[-1] == ("commit", {TopicPartition(T.requests, 0): 4})
    for reason in ("json", "kind", "schema_version"):
        assert reg.get_sample_value("towerstream_dead_letters_total", {"topic": T.requests, "reason": reason}) == 1


def test_an_undelivered_ranking_is_never_committed(fakes: Any) -> None:
    loop, journal, _, _ = build(fakes, [rec(0, encode_event(request(0)))], fail=True)
    with pytest.raises(KafkaTransportError):
        loop.run(idle_timeout_s=0.05)
    assert not any(j[0] == "commit" for j in journal)


def test_requests_wait_for_a_model_and_an_index(fakes: Any) -> None:
    loop, journal, producer, _ = build(fakes, [rec(0, encode_event(request(0)))], ready=False)
    t = threading.Thread(target=loop.run, kwargs={"idle_timeout_s": 0.2})
    t.start()
    deadline = time.monotonic() + 5
    while loop.stats.not_ready_waits < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(j[0] == "commit" for j in journal)  # held, not skipped
    loop.scorer.index_holder.swap(fakes.flat_handle(9, ["i0", "i1"], np.eye(4, dtype=np.float32)[:2]))
    t.join(timeout=10)
    assert [orjson.loads(v)["index_version"] for tp, v, _ in producer.sent if tp == T.rankings] == [9]
    assert journal[-1] == ("commit", {TopicPartition(T.requests, 0): 1})


def test_stop_while_waiting_leaves_the_batch_uncommitted(fakes: Any) -> None:
    loop, journal, _, _ = build(fakes, [rec(0, encode_event(request(0)))], ready=False)
    t = threading.Thread(target=loop.run)
    t.start()
    while loop.stats.not_ready_waits < 1:
        time.sleep(0.01)
    loop.stop()
    t.join(timeout=10)
    assert not t.is_alive()
    assert not any(j[0] == "commit" for j in journal)


def test_events_follower_feeds_the_evaluator_and_item_features(fakes: Any) -> None:
    journal: list[Any] = []
    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5))
    model = ModelHandle(fakes.FakeTwoTower(prerank={"a": 0.9, "b": 0.1}), "fake", 1)
    ev.record_served("r1", model)
    events = [
        Event(kind="impression", event_id="1", event_time=0.0, user_id="u1", request_id="r1", item_id="a",
              item_features={"cat": "x"}, label=1, position=0),
        Event(kind="impression", event_id="2", event_time=0.0, user_id="u1", request_id="r1", item_id="b",
              label=0, position=1),
        Event(kind="click", event_id="3", event_time=1.0, user_id="u1", request_id="r1", item_id="a", label=1),
        Event(kind="click", event_id="4", event_time=20.0, user_id="u2", request_id="r2", item_id="c", label=1),
    ]
    producer = FakeProducer(journal)
    ec = EventConsumer(FakeConsumer([rec(n, encode_event(e), T.events) for n, e in enumerate(events)], journal),
                       DeadLetterWriter(producer, T.dead_letter, "g"), batch_size=100, poll_timeout_s=0.01)
    items = ItemFeatureStore()
    EventsFollower(ec, ev, items=items, topics=T).run(idle_timeout_s=0.05)
    assert items(None, ["a"]) == [{"item_id": "a", "i:cat": "x"}]
    assert ev.results()["fake"]["auc"] == 1.0  # the t=20 click moved the watermark past the window
    assert journal[-1] == ("commit", {TopicPartition(T.events, 0): 4})


def test_a_partition_running_ahead_does_not_close_windows_of_a_slower_one(fakes: Any) -> None:
    from streams.consumer import EventBatch

    ev = OnlineEvaluator(OnlineEvalConfig(window_seconds=5))
    ev.record_served("r1", ModelHandle(fakes.FakeTwoTower(prerank={"a": 0.9, "b": 0.1}), "fake", 1))
    clock = {"t": 0.0}
    follower = EventsFollower(EventConsumer(FakeConsumer([], []), DeadLetterWriter(FakeProducer([]), "dl", "g")),
                              ev, topics=T, idle_partition_s=10.0, clock=lambda: clock["t"])

    def batch(*pairs: tuple[int, Event]) -> EventBatch:
        records = [Record(T.events, p, n, b"k", encode_event(e), 0) for n, (p, e) in enumerate(pairs)]
        return EventBatch([e for _, e in pairs], records, {})

    imp = [Event(kind="impression", event_id=f"i{x}", event_time=0.0, user_id="u1", request_id="r1", item_id=x,
                 label=0, position=0) for x in "ab"]
    other = Event(kind="impression", event_id="o", event_time=100.0, user_id="u2", request_id="r9", item_id="z",
                  label=0, position=0)
    click = Event(kind="click", event_id="c", event_time=1.0, user_id="u1", request_id="r1", item_id="a", label=1)
    follower.handle(batch((0, imp[0]), (0, imp[1]), (1, other)))  # partition 1 is 100 s ahead
    assert follower.watermark() == 0.0
    follower.handle(batch((0, click)))
    assert ev.stats()["clicks"]["joined"] == 1 and ev.stats()["clicks"]["late"] == 0
    clock["t"] = 11.0  # partition 1 went idle: it no longer holds anything back, partition 0 is at t=1
    follower.handle(batch((0, Event(kind="click", event_id="c2", event_time=20.0, user_id="u1", request_id="r7",
                                    item_id="q", label=1))))
    assert follower.watermark() == 20.0
    assert ev.results()["fake"]["auc"] == 1.0


def test_commits_can_be_batched_but_always_follow_a_flush(fakes: Any) -> None:
    records = [rec(n, encode_event(request(n))) for n in range(6)]
    loop, journal, producer, _ = build(fakes, records)
    loop.consumer.batch_size = 2  # three batches
    loop.commit_interval_s = 3600.0  # no commit while records keep coming
    loop.run(idle_timeout_s=0.05)
    commits = [j for j in journal if j[0] == "commit"]
    assert commits == [("commit", {TopicPartition(T.requests, 0): 6})]  # once, when the topic went idle
    i = journal.index(commits[0])
    assert journal[i - 1] == ("flush",)
    assert sum(1 for t, _, _ in producer.sent if t == T.rankings) == 6
