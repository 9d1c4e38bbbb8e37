"""Item deltas through the real scorer process, a real Kafka broker and real FAISS.

The scorer (``ServingApp``) serves version 1, built by the real indexer service from a
trained two-tower checkpoint. Item events on ``<prefix>.items`` then add a new item and
retire a served one; the scorer applies them on version 1 (embedded with version 1's own
frozen tower, ``tower.ckpt``) before any rebuild. A rebuild by the indexer service, whose
catalogue follows the same items topic, supersedes the deltas and answers the same; a
rollback to version 1 replays them; the freshness histogram is exported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from indexer import Announcer, ArtifactStore, Catalogue, FileCheckpointSource, IndexerService
from indexer.announce import Announcement
from indexer.catalogue import item_x
from indexer.delta import DeltaHandle
from indexer.follow import StreamFollower
from indexer.item_follow import version_tower
from learners.checkpoint import load_checkpoint
from serving.app import ServeConfig, ServingApp
from serving.scorer import ScoreRequest
from streams.deadletter import decode_dead_letter
from streams.items import ItemEvent, encode_item_event, key_for_item
from streams.transport import make_producer

from tests.test_serving.test_e2e_kafka import read_all, scorer_topics_and_index, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _aimed_at(encode_items: Any, item_id: str, features: dict) -> np.ndarray:
    """A query vector pointing at one item: its own (normalised) item vector."""
    v = np.asarray(encode_items([item_x(item_id, features)]), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_scorer_serves_new_items_before_a_rebuild_never_retired_ones_and_rebuild_agrees(
        kafka_bootstrap: str, trained_artifacts: Any, tmp_path: Path) -> None:
    art = trained_artifacts
    settings, topics, index_root = scorer_topics_and_index(kafka_bootstrap, art, tmp_path, "delta")
    store = ArtifactStore(index_root)
    v1 = store.get(1)
    assert "tower.ckpt" in v1.manifest["files"]  # the version keeps the tower it was built with
    tower = load_checkpoint(art.checkpoint).learner()  # the same checkpoint: the test's own view of the tower

    producer = make_producer(settings)
    registry = CollectorRegistry()
    app = ServingApp(ServeConfig(checkpoint=art.checkpoint, index_root=index_root, kafka=settings, topics=topics,
                                 host="127.0.0.1", port=0, catalogue=art.catalogue, online_eval=False,
                                 group_id=f"{topics.prefix}-scorer"), registry=registry)
    catalogue = Catalogue()
    catalogue.load_jsonl(art.catalogue)
    follower = StreamFollower(settings, catalogue, topics=topics, poll_timeout_s=0.2)
    indexer = IndexerService(store, catalogue, FileCheckpointSource(art.checkpoint),
                             announcer=Announcer(producer, topics))
    try:
        app.start()
        follower.start()
        wait_until(lambda: app.holder.version == 1, 60, "the scorer to serve version 1")
        served_ids = sorted(art.index_ids)
        retired = served_ids[3]
        retired_x = next(x for x in catalogue.snapshot().xs if x["item_id"] == retired)
        retired_features = {k[2:]: v for k, v in retired_x.items() if k.startswith("i:")}
        new_id, new_features = "brand-new-item", dict(retired_features)
        q_retired = _aimed_at(tower.encode_items, retired, retired_features)
        before = app.holder.search(q_retired, 5)
        assert before.ids[0, 0] == retired  # served before its retirement

        t_sent = time.time()
        for ev in (ItemEvent("upsert", new_id, t_sent, new_features), ItemEvent("retire", retired, t_sent)):
            producer.send(topics.items, encode_item_event(ev), key=key_for_item(ev.item_id))
        producer.send(topics.items, b'{"op": "upsert", "item_id": 7}', key=b"bad")
        producer.flush()
        wait_until(lambda: getattr(app.holder.current, "delta_seq", 0) >= 2, 60,
                   lambda: f"the scorer to apply the item events (serving {app.holder.current!r})")
        served = app.holder.current
        assert isinstance(served, DeltaHandle) and served.version == 1  # no rebuild happened
        assert served.delta_seq == 2  # the items topic's offset + 1 of the last event applied (the bad one is dead)

        q_new = _aimed_at(tower.encode_items, new_id, new_features)
        r = app.holder.search(np.concatenate([q_new, q_retired]), 10)
        assert r.ids[0, 0] == new_id and retired not in r.ids and r.version == 1
        # and through the scorer's own request path: a retired item is never ranked
        wait_until(lambda: app.models.current() is not None, 60, "the scorer to load the model")
        for n in range(20):
            ranking = app.scorer.score(ScoreRequest(request_id=f"r{n}", user_id=f"u{n}", k=50))
            assert ranking.index_version == 1 and retired not in {i.item_id for i in ranking.items}
            assert ranking.index_delta_seq == 2 and ranking.to_dict()["index_delta_seq"] == 2
        name = "towerstream_item_freshness_seconds"
        assert registry.get_sample_value(f"{name}_count") == 1.0  # one upsert became retrievable
        assert 0.0 <= registry.get_sample_value(f"{name}_sum") < 60.0
        assert registry.get_sample_value("towerstream_index_delta_seq") == 2.0
        assert served.manifest["version"] == 1  # the base's: the scorer's index-age gauge reads published_at
        age = registry.get_sample_value("towerstream_index_age_seconds")
        assert age is not None and 0 <= age < 3600
        dead = [decode_dead_letter(rec.value) for rec in read_all(settings, topics.dead_letter, 1)]
        assert [(d.topic, d.reason) for d in dead] == [(topics.items, "invalid_item_event")]

        # ---- a full rebuild (same checkpoint, so the same tower) supersedes the deltas
        wait_until(lambda: new_id in catalogue and retired not in catalogue, 60,
                   "the indexer's catalogue to follow the items topic")
        outcome = indexer.build_once(trigger="test")
        assert outcome.status == "published" and outcome.version == 2, outcome
        assert outcome.manifest["items"]["covered_seq"] == 2
        wait_until(lambda: app.holder.version == 2, 60, "the scorer to serve version 2")
        rebuilt = app.holder.current
        assert isinstance(rebuilt, DeltaHandle) and rebuilt.delta_seq == 2 and len(rebuilt.side_ids) == 0
        r2 = app.holder.search(np.concatenate([q_new, q_retired]), 10)
        assert r2.ids[0, 0] == new_id and retired not in r2.ids
        np.testing.assert_array_equal(r2.ids[0, :5], r.ids[0, :5])  # same tower: the rebuild agrees
        np.testing.assert_allclose(r2.scores[0, :5], r.scores[0, :5], rtol=1e-5, atol=1e-6)

        # ---- rollback to version 1: its deltas are replayed, the retired item stays retired
        info = store.rollback(1)
        Announcer(producer, topics).announce(Announcement.for_version(info, action="rollback"))
        wait_until(lambda: app.holder.version == 1, 60, "the scorer to serve version 1 again")
        back = app.holder.current
        assert isinstance(back, DeltaHandle) and back.delta_seq == 2
        r3 = app.holder.search(np.concatenate([q_new, q_retired]), 10)
        assert r3.ids[0, 0] == new_id and retired not in r3.ids
        assert registry.get_sample_value(f"{name}_count") == 1.0  # a replay is not a second first time
    finally:
        follower.stop()
        app.stop()
        producer.close()


def test_a_version_without_its_tower_still_hides_retired_items(kafka_bootstrap: str, trained_artifacts: Any,
                                                               tmp_path: Path) -> None:
    """A version written before versions kept their tower: retirements still apply at once,
    upserts wait for the next build (logged), nothing breaks."""
    art = trained_artifacts
    settings, topics, index_root = scorer_topics_and_index(kafka_bootstrap, art, tmp_path, "delta")
    assert version_tower(ArtifactStore(index_root).get(1)) is not None
    # strip the tower from the manifest (as an older towerstream wrote it)
    import orjson

    mpath = ArtifactStore(index_root).version_dir(1) / "manifest.json"
    manifest = orjson.loads(mpath.read_bytes())
    del manifest["files"]["tower.ckpt"]
    mpath.write_bytes(orjson.dumps(manifest))
    tower = load_checkpoint(art.checkpoint).learner()
    retired = sorted(art.index_ids)[0]
    producer = make_producer(settings)
    app = ServingApp(ServeConfig(checkpoint=art.checkpoint, index_root=index_root, kafka=settings, topics=topics,
                                 host="127.0.0.1", port=0, catalogue=art.catalogue, online_eval=False,
                                 group_id=f"{topics.prefix}-scorer"), registry=CollectorRegistry())
    try:
        app.start()
        wait_until(lambda: app.holder.version == 1, 60, "the scorer to serve version 1")
        for ev in (ItemEvent("upsert", "waits-for-a-build", time.time(), {"topic": "t1"}),
                   ItemEvent("retire", retired, time.time())):
            producer.send(topics.items, encode_item_event(ev), key=key_for_item(ev.item_id))
        producer.flush()
        wait_until(lambda: getattr(app.holder.current, "delta_seq", 0) >= 2, 60, "the item events applied")
        q = np.asarray(tower.encode_items([item_x(retired, {})]), dtype=np.float32)
        r = app.holder.search(q, 20)
        assert retired not in r.ids and "waits-for-a-build" not in r.ids
    finally:
        app.stop()
        producer.close()
