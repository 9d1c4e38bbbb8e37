"""Delta updates between rebuilds (indexer.delta) on real FAISS indexes, and item events
travelling through a real Kafka broker into the served answers."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from indexer.build import BuildConfig, build_index
from indexer.catalogue import item_x
from indexer.delta import DeltaLog
from indexer.handle import IndexHandle, IndexHolder
from indexer.testing import FakeTwoTower, catalogue_records
from streams.items import ItemEvent, ItemEventError, decode_item_event, encode_item_event, key_for_item
from streams.topics import Topics
from streams.transport import KafkaSettings, TopicPartition, ensure_topics, make_consumer, make_producer

D = 16
TOWER = FakeTwoTower(dim=D, n_topics=8, seed=3)


def _base(records, version: int, kind: str = "flat") -> IndexHandle:
    ids = np.array([r["item_id"] for r in records])
    vecs = TOWER.encode_items([item_x(r["item_id"], r["features"]) for r in records])
    built = build_index(vecs, BuildConfig(kind=kind, recall_k=10, nlist=16, probe_queries=50))
    return IndexHandle(built.index, ids, version, {})


def _records(n: int, start: int = 0):
    return [{"item_id": r["item_id"], "features": r["item_features"]}
            for r in catalogue_records(n, n_topics=8, start=start)]


def _aimed_at(item_id: str, features) -> np.ndarray:
    """A query vector equal to the item's own vector: the item must be its top answer."""
    return TOWER.encode_items([item_x(item_id, features)])


def test_records_shape():
    r = _records(3)
    assert {"item_id", "features"} <= set(r[0]) and "topic" in r[0]["features"]


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_new_item_returned_and_retired_never(kind):
    records = _records(800)
    dl = DeltaLog(TOWER.encode_items, clock=lambda: 100.0)
    h = dl.rebase(_base(records, 1, kind))
    new = ItemEvent("upsert", "new-1", 99.5, {"topic": "t5"})
    assert "new-1" not in h.search(_aimed_at("new-1", new.features), 10).ids
    h2 = dl.apply(h, [new])
    r = h2.search(_aimed_at("new-1", new.features), 10)
    assert r.ids[0, 0] == "new-1" and r.version == 1 and r.delta_seq == 1
    assert dl.freshness_s == [0.5]
    # retire the new item and one base item: neither is returned afterwards, for any query
    victim = records[7]
    h3 = dl.apply(h2, [ItemEvent("retire", "new-1", 100.0), ItemEvent("retire", victim["item_id"], 100.0)])
    queries = np.concatenate([_aimed_at("new-1", new.features), _aimed_at(victim["item_id"], victim["features"]),
                              TOWER.encode_users([{"user_id": f"u{i}", "u:topic": f"t{i % 8}"} for i in range(50)])])
    ids = h3.search(queries, 20).ids
    assert "new-1" not in ids and victim["item_id"] not in ids
    assert (ids != "").all()  # the mask never shortens an answer
    assert h3.delta_seq == 3 and h3.size == 799
    # the earlier handle is unchanged (immutable): it still answers with new-1
    assert h2.search(_aimed_at("new-1", new.features), 1).ids[0, 0] == "new-1"


def test_rebuild_after_deltas_gives_the_same_answers():
    records = _records(600)
    dl = DeltaLog(TOWER.encode_items)
    h = dl.rebase(_base(records, 1))
    changed = dict(records[3], features={"topic": "t6"})
    events = [ItemEvent("upsert", f"n{i}", 0.0, {"topic": f"t{i % 8}"}) for i in range(30)]
    events += [ItemEvent("retire", records[i]["item_id"], 0.0) for i in (10, 11, 12)]
    events += [ItemEvent("upsert", changed["item_id"], 0.0, changed["features"])]
    h = dl.apply(h, events)
    # the catalogue a full rebuild sees: same tower, same changes
    retired = {records[i]["item_id"] for i in (10, 11, 12)}
    cat = [r for r in records if r["item_id"] not in retired and r["item_id"] != changed["item_id"]]
    cat += [changed] + [{"item_id": e.item_id, "features": dict(e.features)} for e in events[:30]]
    rebuilt = dl.rebase(_base(cat, 2), covered_seq=dl.seq)
    assert rebuilt.delta_seq == dl.seq and rebuilt.version == 2 and not len(rebuilt.side_ids)
    queries = TOWER.encode_users([{"user_id": f"u{i}", "u:topic": f"t{i % 8}"} for i in range(64)])
    a, b = h.search(queries, 10), rebuilt.search(queries, 10)
    assert (a.ids == b.ids).all()
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert a.ids.size and (a.ids != "").all()


def test_rollback_replays_deltas_consistently():
    v1 = _records(400)
    v2 = _records(400, start=400)
    dl = DeltaLog(TOWER.encode_items)
    holder = IndexHolder()
    serving = dl.rebase(_base(v1, 1))
    new = ItemEvent("upsert", "fresh", 0.0, {"topic": "t2"})
    serving = dl.apply(serving, [new, ItemEvent("retire", v1[0]["item_id"], 0.0)])
    base2 = _base(v2 + [v1[0]], 2)  # a (bad) rebuild that still has the retired item
    serving = dl.rebase(base2, covered_seq=0)  # its cut covered none of the log
    assert serving.search(_aimed_at(v1[0]["item_id"], v1[0]["features"]), 5).ids[0, 0] != v1[0]["item_id"]
    serving = dl.apply(serving, [ItemEvent("retire", "fresh", 0.0)])
    # rollback to v1: the whole log is replayed on it, so v1 serves what the log says
    back = dl.rebase(_base(v1, 1), covered_seq=None)
    assert back.version == 1 and back.delta_seq == 3
    q = np.concatenate([_aimed_at("fresh", new.features), _aimed_at(v1[0]["item_id"], v1[0]["features"])])
    ids = back.search(q, 10).ids
    assert "fresh" not in ids and v1[0]["item_id"] not in ids
    holder.swap(back, reap=False)  # the holder serves a delta handle like any handle
    r = holder.search(q, 3)
    assert r.version == 1 and r.delta_seq == 3


def test_nan_delta_refused_with_count_and_log(caplog):
    records = _records(300)

    def encoder(xs):
        v = TOWER.encode_items(xs)
        for i, x in enumerate(xs):
            if x["item_id"] == "bad":
                v[i, 0] = np.nan
        return v

    dl = DeltaLog(encoder)
    h = dl.rebase(_base(records, 1))
    with caplog.at_level("WARNING", logger="indexer.delta"):
        h2 = dl.apply(h, [ItemEvent("upsert", "bad", 0.0, {"topic": "t1"}),
                          ItemEvent("upsert", "good", 0.0, {"topic": "t1"})])
    assert dl.refused_total == 1 and "bad" in dl.refusals[0]
    assert any("bad" in rec.getMessage() and "not finite" in rec.getMessage() for rec in caplog.records)
    assert "bad" not in h2.side_ids.tolist() and "good" in h2.side_ids.tolist()
    r = h2.search(TOWER.encode_users([{"user_id": f"u{i}", "u:topic": "t1"} for i in range(20)]), 50)
    assert "bad" not in r.ids and np.isfinite(r.scores).all()


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not JSON"), (b"[1]", "not a JSON object"),
    (b'{"op": "upsert", "item_id": "", "event_time": 1}', "item_id"),
    (b'{"op": "upsert", "item_id": "a", "event_time": "x"}', "event_time"),
    (b'{"op": "upsert", "item_id": "a", "event_time": 1, "features": [1]}', "features"),
    (b'{"op": "upsert", "item_id": "a", "event_time": 1, "features": {"tags": [1, 2]}}', "features.tags"),
    (None, "tombstone"),
])
def test_bad_item_records_raise_a_clear_reason(raw, reason):
    with pytest.raises(ItemEventError, match=reason):
        decode_item_event(raw)


@pytest.mark.kafka
def test_item_produced_after_live_version_is_served_through_kafka(kafka_bootstrap):
    settings = KafkaSettings(kafka_bootstrap)
    topics = Topics(prefix=f"test-delta-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings, {topics.items: 1})
    records = _records(500)
    dl = DeltaLog(TOWER.encode_items)
    holder = IndexHolder(dl.rebase(_base(records, 1)))  # the live version, built before the item exists
    new_features = {"topic": "t4"}
    producer = make_producer(settings)
    try:
        for ev in (ItemEvent("upsert", "late-item", time.time(), new_features),
                   ItemEvent("retire", records[5]["item_id"], time.time())):
            producer.send(topics.items, encode_item_event(ev), key=key_for_item(ev.item_id))
        producer.send(topics.items, b"garbage", key=b"x")
        producer.flush()
    finally:
        producer.close()
    consumer = make_consumer(settings, None)
    consumer.assign([TopicPartition(topics.items, 0)])
    got, bad = [], []
    deadline = time.monotonic() + 60
    try:
        while len(got) + len(bad) < 3 and time.monotonic() < deadline:
            for rec in consumer.poll(timeout_s=1.0):
                try:
                    got.append(decode_item_event(rec.value))
                except ItemEventError as exc:
                    bad.append(str(exc))
    finally:
        consumer.close()
    assert [e.op for e in got] == ["upsert", "retire"] and len(bad) == 1
    holder.swap(dl.apply(holder.current, got), reap=False)
    q = np.concatenate([_aimed_at("late-item", new_features),
                        _aimed_at(records[5]["item_id"], records[5]["features"])])
    r = holder.search(q, 10)
    assert r.ids[0, 0] == "late-item" and records[5]["item_id"] not in r.ids
    assert r.version == 1 and r.delta_seq == 2
    assert len(dl.freshness_s) == 1 and dl.freshness_s[0] >= 0


def test_freshness_histogram_and_refusals_exported_and_alerted_on():
    import pathlib

    import yaml
    from prometheus_client import CollectorRegistry

    from indexer.freshness import FreshnessMetrics

    reg = CollectorRegistry()
    m = FreshnessMetrics(reg)

    def encoder(xs):
        v = TOWER.encode_items(xs)
        v[[x["item_id"] == "nan" for x in xs]] = np.nan
        return v

    dl = DeltaLog(encoder, clock=lambda: 10.0, on_fresh=m.observe, on_refused=m.refused)
    h = dl.apply(dl.rebase(_base(_records(100), 1)), [ItemEvent("upsert", "a", 9.0, {"topic": "t1"}),
                                                       ItemEvent("upsert", "b", 7.0, {"topic": "t1"}),
                                                       ItemEvent("upsert", "nan", 9.5, {"topic": "t1"})])
    m.served(h.delta_seq)
    name = "towerstream_item_freshness_seconds"
    assert reg.get_sample_value(f"{name}_count") == 2.0
    assert reg.get_sample_value(f"{name}_sum") == pytest.approx(1.0 + 3.0)
    assert reg.get_sample_value(f"{name}_bucket", {"le": "2.0"}) == 1.0  # a at 1 s in, b at 3 s out
    assert reg.get_sample_value("towerstream_index_delta_refused_total") == 1.0
    assert reg.get_sample_value("towerstream_index_delta_seq") == 3.0
    rules = yaml.safe_load((pathlib.Path(__file__).parents[2] / "deploy/prometheus/rules/freshness.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    assert f"{name}_bucket" in exprs and "towerstream_index_delta_refused_total" in exprs
    prom = yaml.safe_load((pathlib.Path(__file__).parents[2] / "deploy/prometheus/prometheus.yml").read_text())
    assert "rules/*.yml" in prom["rule_files"]


@pytest.mark.kafka
def test_follower_applies_items_from_kafka_dead_letters_bad_ones_and_survives_a_rebuild(kafka_bootstrap):
    from indexer.item_follow import ItemDeltaFollower
    from streams.deadletter import DeadLetterWriter, decode_dead_letter

    settings = KafkaSettings(kafka_bootstrap)
    topics = Topics(prefix=f"test-follow-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings, {topics.items: 1, topics.dead_letter: 1})
    records = _records(400)
    holder = IndexHolder(_base(records, 1))  # a plain published handle, as the watcher serves it
    dl = DeltaLog(TOWER.encode_items)
    producer = make_producer(settings)
    follower = ItemDeltaFollower(holder, dl, DeadLetterWriter(producer, topics.dead_letter, "scorer"))
    for ev in (ItemEvent("upsert", "kafka-new", time.time(), {"topic": "t3"}),
               ItemEvent("retire", records[9]["item_id"], time.time())):
        producer.send(topics.items, encode_item_event(ev), key=key_for_item(ev.item_id))
    producer.send(topics.items, b'{"op": "upsert"}', key=b"bad")
    producer.flush()
    consumer = make_consumer(settings, None)
    consumer.assign([TopicPartition(topics.items, 0)])
    deadline = time.monotonic() + 60
    try:
        while follower.applied < 2 and time.monotonic() < deadline:
            follower.poll_once(consumer, timeout_s=1.0)
    finally:
        consumer.close()
    q = np.concatenate([_aimed_at("kafka-new", {"topic": "t3"}), _aimed_at(records[9]["item_id"],
                                                                            records[9]["features"])])
    r = holder.search(q, 10)
    assert r.ids[0, 0] == "kafka-new" and records[9]["item_id"] not in r.ids and r.delta_seq == 2
    assert follower.dead_letters.counts["invalid_item_event"] == 1 and len(dl.freshness_s) == 1
    # the watcher swaps in a rebuild that still has the retired item: the next poll replays the log on it
    holder.swap(_base(records, 2), reap=False)
    follower.handle_records([])
    r = holder.search(q, 10)
    assert r.version == 2 and r.ids[0, 0] == "kafka-new" and records[9]["item_id"] not in r.ids
    assert len(dl.freshness_s) == 1  # replay does not count an item fresh twice
    dead = make_consumer(settings, None)
    dead.assign([TopicPartition(topics.dead_letter, 0)])
    got = []
    deadline = time.monotonic() + 30
    try:
        while not got and time.monotonic() < deadline:
            got = dead.poll(timeout_s=1.0)
    finally:
        dead.close()
        producer.close()
    letter = decode_dead_letter(got[0].value)
    assert letter.reason == "invalid_item_event" and letter.original_value == b'{"op": "upsert"}'
    assert "item_id" in letter.message or "event_time" in letter.message or "op" in letter.message


def test_items_a_rebuild_covered_first_are_counted_fresh_at_the_swap_once():
    """An upsert logged before any version, then covered by the first build: its freshness
    is the moment that base is served, recorded once (a later rebase does not count it again)."""
    records = _records(50)
    clock = iter([100.0, 200.0, 300.0]).__next__
    dl = DeltaLog(TOWER.encode_items, clock=clock)
    dl.append([ItemEvent("upsert", records[0]["item_id"], 99.0, records[0]["features"]),
               ItemEvent("upsert", "not-in-the-build", 99.5, {"topic": "t1"})], seqs=[1, 2])
    h = dl.rebase(_base(records, 1), covered_seq=2)  # the build covered both; only one is in it
    assert h.delta_seq == 2 and not len(h.side_ids)
    assert dl.freshness_s == [1.0]  # 100 - 99: retrievable from the swap on
    dl.rebase(_base(records, 2), covered_seq=2)
    assert dl.freshness_s == [1.0]


def test_explicit_sequences_skip_redelivered_events_and_trim_keeps_the_rest():
    dl = DeltaLog(TOWER.encode_items)
    dl.append([ItemEvent("upsert", "a", 0.0), ItemEvent("upsert", "b", 0.0)], seqs=[5, 6])
    dl.append([ItemEvent("upsert", "b", 0.0), ItemEvent("retire", "a", 0.0)], seqs=[6, 7])  # 6 again: skipped
    assert (dl.seq, len(dl), dl.first_seq) == (7, 3, 5)
    assert dl.trim(5) == 1 and (len(dl), dl.first_seq) == (2, 6)
    with pytest.raises(ValueError, match="2 events but 1 sequence"):
        dl.append([ItemEvent("upsert", "c", 0.0), ItemEvent("upsert", "d", 0.0)], seqs=[8])
