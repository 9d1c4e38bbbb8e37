"""The indexer service driven by a fake clock: freshness, triggers, guardrail, rollback, restart."""

from __future__ import annotations

import numpy as np

from indexer.announce import Announcement
from indexer.artifacts import ArtifactStore
from indexer.build import BuildConfig
from indexer.catalogue import Catalogue
from indexer.errors import IndexerError
from indexer.handle import IndexHolder
from indexer.service import IndexerService
from indexer.testing import FakeCheckpointSource, FakeTwoTower, catalogue_records, labelled_impressions
from indexer.watcher import IndexWatcher
from streams.transport import KafkaSettings

CONFIG = BuildConfig(flat_threshold=1000, recall_k=20, probe_queries=100)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class DirectAnnouncer:
    """Delivers announcements straight to a scorer-side watcher (the Kafka path is in test_kafka)."""

    def __init__(self, watcher: IndexWatcher) -> None:
        self.watcher = watcher
        self.sent: list[Announcement] = []

    def announce(self, announcement: Announcement) -> None:
        self.sent.append(announcement)
        self.watcher.apply(announcement)


def _setup(tmp_path, n_items=2000, **kwargs):
    clock = FakeClock()
    catalogue = Catalogue(clock=clock)
    for r in catalogue_records(n_items):
        catalogue.observe_record(r)
    holder = IndexHolder()
    watcher = IndexWatcher(KafkaSettings("unused:9092"), holder, tmp_path)
    announcer = DirectAnnouncer(watcher)
    source = FakeCheckpointSource(FakeTwoTower())
    xs, ys = labelled_impressions(1500, n_items=n_items, seed=4)
    kwargs.setdefault("period_s", 10.0)
    service = IndexerService(
        ArtifactStore(tmp_path), catalogue, source, build_config=CONFIG, announcer=announcer,
        held_out=lambda model: (xs, ys), clock=clock, wall_clock=clock, **kwargs,
    )
    return service, clock, holder, source, announcer


def test_a_new_stream_item_is_served_within_one_period(tmp_path) -> None:
    service, clock, holder, source, _ = _setup(tmp_path, period_s=10.0)
    enc = source.encoder
    appeared, served_at = 23.0, None
    new_x = {"item_id": "fresh-1", "i:topic": "t3"}
    while clock.now <= 60.0:
        if clock.now == appeared:
            service.catalogue.upsert("fresh-1", {"topic": "t3"})
        service.tick()
        if served_at is None and holder.current is not None and "fresh-1" in set(holder.current.ids):
            served_at = clock.now
        clock.now += 1.0
    assert served_at is not None
    # Fake time stands still during a build, so the bound is the period itself.
    assert appeared <= served_at <= appeared + service.period_s
    r = holder.search(enc.encode_items([new_x]), k=5)
    assert r.ids[0, 0] == "fresh-1"
    # Periods in which nothing changed built nothing.
    assert service.metrics.builds_total == 2 and service.metrics.skipped_total >= 3


def test_every_n_updates_builds_before_the_period(tmp_path) -> None:
    service, clock, holder, source, _ = _setup(tmp_path, period_s=1000.0, every_n_updates=500)
    assert service.tick().status == "published"  # the first build
    clock.now = 5.0
    source.bump(events_learned=400)
    assert service.tick() is None
    clock.now = 6.0
    source.bump(events_learned=900)
    outcome = service.tick()
    assert outcome.status == "published" and outcome.manifest["trigger"] == "updates"
    assert outcome.manifest["checkpoint"]["events_learned"] == 900
    assert holder.version == outcome.version == 2


def test_a_broken_model_is_refused_counted_and_the_served_version_stays(tmp_path) -> None:
    service, clock, holder, source, announcer = _setup(tmp_path)
    first = service.build_once()
    assert first.status == "published" and first.manifest["quality"]["auc"] > 0.7
    source.bump(encoder=FakeTwoTower(broken=True))
    refused = service.build_once()
    assert refused.status == "refused" and any("auc" in r for r in refused.reasons)
    assert service.metrics.refused_total == 1 and service.guardrail.refusals["auc"] == 1
    assert service.store.current() == first.version == holder.version
    assert [v.version for v in service.store.list_versions()] == [first.version]
    assert len(announcer.sent) == 1
    # The same refused inputs are not rebuilt every tick.
    assert service.build_once().status == "skipped"


def test_non_finite_vectors_are_refused(tmp_path) -> None:
    class NaNTower(FakeTwoTower):
        def encode_items(self, xs):
            v = super().encode_items(xs)
            v[0, 0] = np.nan
            return v

    service, *_ = _setup(tmp_path, n_items=200)
    service.checkpoints.encoder = NaNTower()
    outcome = service.build_once()
    assert outcome.status == "refused" and "NaN" in outcome.reasons[0]
    assert service.store.current() is None


def test_rollback_reserves_an_earlier_version_and_the_scorer_follows(tmp_path) -> None:
    service, clock, holder, source, announcer = _setup(tmp_path)
    v1 = service.build_once().version
    service.catalogue.upsert("extra", {"topic": "t1"})
    v2 = service.build_once().version
    assert holder.version == v2 == v1 + 1
    info = service.store.rollback(v1)
    announcer.announce(Announcement.for_version(info, action="rollback"))
    assert service.store.current() == v1 and holder.version == v1
    assert "extra" not in set(holder.current.ids)
    # Rolling forward again is a rollback too; a replayed publish older than the served
    # version is stale and skipped.
    service.store.rollback(v2)
    announcer.watcher.apply(Announcement.for_version(service.store.get(v2), action="rollback"))
    assert not announcer.watcher.apply(Announcement.for_version(service.store.get(v1)))
    assert holder.version == v2 and announcer.watcher.skipped == 1


def test_restart_reuses_the_served_centroids(tmp_path) -> None:
    service, *_ = _setup(tmp_path)
    first = service.build_once()
    assert first.manifest["retrained"] is True and first.manifest["index"]["kind"] == "ivf_flat"
    again, clock, holder, source, _ = _setup(tmp_path)  # a new process on the same store
    again.start()
    assert again.metrics.index_version == first.version
    again.catalogue.upsert("extra", {"topic": "t2"})
    second = again.build_once()
    assert second.status == "published" and second.manifest["retrained"] is False
    assert second.manifest["index"]["params"]["nlist"] == first.manifest["index"]["params"]["nlist"]


def test_a_failing_checkpoint_is_counted_and_the_loop_goes_on(tmp_path) -> None:
    service, clock, holder, source, _ = _setup(tmp_path)

    def broken_load():
        raise IndexerError("checkpoint unreadable")

    source.load = broken_load
    assert service.tick().status == "failed" and service.metrics.failed_total == 1
    del source.load  # back to the class method
    clock.now = 11.0
    assert service.tick().status == "published"


def test_a_pinned_rollback_holds_until_unpinned(tmp_path) -> None:
    service, clock, holder, source, announcer = _setup(tmp_path)
    v1 = service.build_once().version
    service.catalogue.upsert("extra", {"topic": "t1"})
    v2 = service.build_once().version
    service.store.rollback(v1, pin=True)
    service.catalogue.upsert("extra-2", {"topic": "t2"})
    source.bump(events_learned=10_000)
    outcome = service.build_once()
    assert outcome.status == "skipped" and "pinned to version 1" in outcome.reasons[0]
    assert service.store.current() == v1 and service.store.latest().version == v2
    assert service.store.unpin()
    published = service.build_once()
    assert published.status == "published" and published.version == v2 + 1
    assert service.store.current() == published.version


def test_a_real_checkpoint_is_indexed_with_the_vectors_of_the_dict_path(tmp_path) -> None:
    """The service embeds the catalogue through ``encode_items`` (columnar inside): the
    published (exact, flat) index holds bit for bit what the pre-columnar dict path gives,
    in chunks of ``embed_batch``, unknown items and tags included."""
    import torch

    from indexer.handle import load_handle
    from indexer.service import FileCheckpointSource
    from learners.checkpoint import load_checkpoint, save_checkpoint
    from learners.registry import make_learner

    def tags(j: int) -> tuple[str, ...]:
        return tuple(f"g{(j * k) % 11}" for k in range(j % 4))

    xs, ys = labelled_impressions(800, n_items=600, seed=1)
    for x in xs:
        j = int(x["item_id"][1:])
        x["i:tags"], x["i:price"] = tags(j), [0.5, 1.25, 3.0][j % 3]
    for name in ("two-tower", "dat"):
        learner = make_learner(name, seed=0, field_dim=8, hidden=(16,), out_dim=16)
        learner.learn_many(xs, ys)
        ckpt = tmp_path / f"{name}.ckpt"
        save_checkpoint(ckpt, learner, {"towerstream.events": {0: 800}}, events_learned=800)
        catalogue = Catalogue(clock=FakeClock())
        for r in catalogue_records(700):  # i600..i699 were never shown
            j = int(r["item_id"][1:])
            feats = {**r["item_features"], "tags": list(tags(j) + (("new-tag",) if j % 5 == 0 else ())),
                     "price": [0.5, 1.25, 3.0, 9.5][j % 4]}
            catalogue.observe_record({"item_id": r["item_id"], "item_features": feats})
        store = ArtifactStore(tmp_path / name)
        service = IndexerService(store, catalogue, FileCheckpointSource(ckpt), build_config=CONFIG,
                                 embed_batch=300, clock=FakeClock(), wall_clock=FakeClock())
        assert service.build_once().status == "published"
        handle = load_handle(store.current_info().path)
        snap = catalogue.snapshot()
        frozen = load_checkpoint(ckpt).learner()
        with torch.inference_mode():
            want = np.concatenate([frozen._tower(list(snap.xs[lo: lo + 300]), "item").vec.numpy()
                                   for lo in range(0, len(snap), 300)])
        assert handle.ids.tolist() == list(snap.ids)
        assert np.array_equal(handle.index.reconstruct_n(0, handle.index.ntotal), want)
