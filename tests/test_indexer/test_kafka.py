"""The indexer against a real Kafka broker: announcements, the watcher's hot swap, late
scorers, and an item travelling from the events topic into the served index."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from indexer.announce import Announcement, Announcer, ensure_control_topic, latest_announcement
from indexer.artifacts import ArtifactStore
from indexer.build import BuildConfig, build_index
from indexer.catalogue import Catalogue
from indexer.follow import RecentWindow, StreamFollower
from indexer.handle import IndexHolder, load_handle
from indexer.service import IndexerService
from indexer.testing import FakeCheckpointSource, FakeTwoTower, mixture_of_gaussians
from indexer.watcher import IndexWatcher
from streams.events import Event, encode_event
from streams.topics import Topics, key_for_user
from streams.transport import KafkaSettings, ensure_topics, make_producer

pytestmark = pytest.mark.kafka
D = 16


@pytest.fixture
def kafka(kafka_bootstrap):
    settings = KafkaSettings(kafka_bootstrap)
    topics = Topics(prefix=f"test-indexer-{uuid.uuid4().hex[:8]}")
    ensure_control_topic(settings, topics)
    producer = make_producer(settings)
    yield settings, topics, Announcer(producer, topics)
    producer.close()


def _publish_tagged(store: ArtifactStore, tag_version: int, n: int) -> int:
    """Write and publish a version whose ids are tagged with its own version number (disjoint id maps)."""
    vecs = mixture_of_gaussians(n, dim=D, n_clusters=20, seed=tag_version)
    built = build_index(vecs, BuildConfig(flat_threshold=1500, recall_k=10, nlist=16, probe_queries=50))
    expected = (store.latest().version + 1) if store.latest() else 1
    assert expected == tag_version
    ids = np.array([f"v{tag_version}-{i}" for i in range(n)])
    info = store.write_version(built.index, ids, {"index": {"kind": built.kind, "params": dict(built.params)}})
    store.publish(info.version)
    return info.version


def _wait(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_watcher_swaps_on_control_topic_announcements_without_torn_answers(tmp_path, kafka) -> None:
    settings, topics, announcer = kafka
    store = ArtifactStore(tmp_path)
    announcer.announce(Announcement.for_version(store.get(_publish_tagged(store, 1, 1000))))
    holder = IndexHolder()
    queries = mixture_of_gaussians(4, dim=D, n_clusters=20, seed=99)
    stop = threading.Event()
    stats = {"queries": 0, "torn": 0, "backwards": 0, "errors": [], "versions": []}
    expected: dict[int, np.ndarray] = {}

    def query_loop() -> None:
        last = 0
        while not stop.is_set():
            if holder.current is None:
                time.sleep(0.001)
                continue
            try:
                r = holder.search(queries, k=10)
            except Exception as exc:  # noqa: BLE001 - the test counts any failure
                stats["errors"].append(repr(exc))
                continue
            stats["queries"] += 1
            # The answer must be exactly what that version's own files answer.
            if r.version not in expected:
                expected[r.version] = load_handle(store.version_dir(r.version)).search(queries, k=10).ids
            stats["torn"] += not np.array_equal(r.ids, expected[r.version])
            stats["backwards"] += r.version < last
            if r.version != last:
                stats["versions"].append(r.version)
            last = r.version

    with IndexWatcher(settings, holder, tmp_path, topics=topics, poll_timeout_s=0.1) as watcher:
        t = threading.Thread(target=query_loop)
        t.start()
        try:
            assert watcher.wait_for_version(1)
            for v in range(2, 6):
                version = _publish_tagged(store, v, 1000 + 300 * (v % 3))
                announcer.announce(Announcement.for_version(store.get(version)))
                assert watcher.wait_for_version(v), f"watcher did not swap to {v}: {watcher.last_error}"
                assert _wait(lambda: stats["versions"][-1:] == [v])
        finally:
            stop.set()
            t.join(30)
    assert stats["errors"] == [] and stats["torn"] == 0 and stats["backwards"] == 0
    assert stats["versions"] == [1, 2, 3, 4, 5] and stats["queries"] > 0
    assert watcher.swaps == 5 and watcher.errors == 0


def test_a_late_scorer_starts_on_the_last_announcement(tmp_path, kafka) -> None:
    settings, topics, announcer = kafka
    assert latest_announcement(settings, topics) is None
    store = ArtifactStore(tmp_path)
    for v in (1, 2, 3):
        announcer.announce(Announcement.for_version(store.get(_publish_tagged(store, v, 500))))
    store.rollback(2)
    announcer.announce(Announcement.for_version(store.get(2), action="rollback"))
    last = latest_announcement(settings, topics)
    assert (last.version, last.action) == (2, "rollback")
    assert last.manifest["item_count"] == 500

    holder = IndexHolder()
    with IndexWatcher(settings, holder, tmp_path, topics=topics, poll_timeout_s=0.1) as watcher:
        assert watcher.wait_for_version(2)
        assert watcher.swaps == 1  # straight to the served version, no replay of 1 and 3


def test_an_item_first_seen_on_the_events_topic_becomes_retrievable(tmp_path, kafka) -> None:
    settings, topics, announcer = kafka
    ensure_topics(settings, {topics.events: 2})
    producer = make_producer(settings)
    encoder = FakeTwoTower()

    def impression(n: int, item: str, topic: str) -> Event:
        return Event(kind="impression", event_id=f"e{n}", event_time=time.time(), user_id=f"u{n % 50}",
                     request_id=f"r{n}", user_features={"topic": f"t{n % 8}"}, item_id=item,
                     item_features={"topic": topic}, label=int(n % 8 == int(topic[1:])), position=0)

    for n in range(400):
        e = impression(n, f"i{n % 200}", f"t{n % 200 % 8}")
        producer.send(topics.events, encode_event(e), key=key_for_user(e.user_id))
    producer.flush()

    catalogue, window = Catalogue(), RecentWindow()
    follower = StreamFollower(settings, catalogue, window, topics=topics, poll_timeout_s=0.1).start()
    service = IndexerService(ArtifactStore(tmp_path / "store"), catalogue, FakeCheckpointSource(encoder),
                             build_config=BuildConfig(recall_k=10), announcer=announcer,
                             held_out=lambda m: window.held_out(m.offsets), period_s=0.5)
    holder = IndexHolder()
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,), kwargs={"poll_s": 0.05})
    try:
        with IndexWatcher(settings, holder, tmp_path / "store", topics=topics, poll_timeout_s=0.1):
            assert _wait(lambda: len(catalogue) == 200)
            runner.start()
            assert _wait(lambda: holder.current is not None and holder.current.size == 200)
            sent_at = time.monotonic()
            e = impression(10_000, "brand-new", "t5")
            producer.send(topics.events, encode_event(e), key=key_for_user(e.user_id))
            producer.flush()
            assert _wait(lambda: "brand-new" in set(holder.current.ids))
            latency = time.monotonic() - sent_at
            r = holder.search(encoder.encode_items([{"item_id": "brand-new", "i:topic": "t5"}]), k=3)
            assert r.ids[0, 0] == "brand-new"
            print(f"freshness: event sent -> retrievable in {latency:.2f} s (period 0.5 s, "
                  f"last build {service.metrics.last_build_seconds:.2f} s)")
    finally:
        stop.set()
        if runner.is_alive():
            runner.join(30)
        follower.stop()
        producer.close()
    assert service.metrics.refused_total == 0 and service.metrics.failed_total == 0
    assert follower.bad_records == 0 and follower.error is None
