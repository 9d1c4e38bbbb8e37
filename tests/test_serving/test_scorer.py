"""Scorer logic with fakes: retrieval + pre-rank order, one version per answer, reloads."""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from indexer.handle import IndexHolder
from serving.errors import BadRequestError, NotReadyError
from serving.metrics import Metrics
from serving.scorer import (
    CheckpointLearnerSource,
    ItemFeatureStore,
    ModelHandle,
    Scorer,
    ScoreRequest,
    StaticLearnerSource,
)


class SwapSource:
    """A learner source whose handle tests replace."""

    def __init__(self, handle: ModelHandle | None = None) -> None:
        self.handle = handle

    def current(self) -> ModelHandle | None:
        return self.handle


def _six_items(fakes: Any, version: int = 1, prefix: str = "i") -> Any:
    # Item n has inner product (10 - n) / 10 with user u0 (vector e0): retrieval order i1 > i2 > ... > i6.
    vecs = np.zeros((6, 4), dtype=np.float32)
    for n in range(1, 7):
        vecs[n - 1, 0] = (10 - n) / 10
        vecs[n - 1, 1] = np.sqrt(1 - vecs[n - 1, 0] ** 2)
    return fakes.flat_handle(version, [f"{prefix}{n}" for n in range(1, 7)], vecs)


def test_retrieves_top_k_then_reorders_by_prerank(fakes: Any) -> None:
    learner = fakes.FakeTwoTower(prerank={"i1": 0.1, "i2": 0.9, "i3": 0.5, "i4": 0.99})
    scorer = Scorer(StaticLearnerSource(learner, version=7), IndexHolder(_six_items(fakes)), k_retrieve=3)
    r = scorer.score(ScoreRequest("r1", "u0", k=3))
    # i4 has the best pre-rank score but is not among the 3 retrieved candidates.
    assert [i.item_id for i in r.items] == ["i2", "i3", "i1"]
    assert [i.rank for i in r.items] == [1, 2, 3]
    assert [i.score for i in r.items] == [0.9, 0.5, 0.1]
    assert [round(i.retrieval_score, 5) for i in r.items] == [0.8, 0.7, 0.9]
    assert (r.index_version, r.model_version, r.learner) == (1, 7, "fake-two-tower")
    assert learner.calls == [("encode_users", 1), ("score_candidates", 3)]


def test_k_truncates_and_defaults(fakes: Any) -> None:
    learner = fakes.FakeTwoTower(prerank={"i1": 0.1, "i2": 0.9, "i3": 0.5})
    scorer = Scorer(StaticLearnerSource(learner), IndexHolder(_six_items(fakes)), k_retrieve=3, k_default=2)
    assert [i.item_id for i in scorer.score(ScoreRequest("r", "u0", k=1)).items] == ["i2"]
    assert [i.item_id for i in scorer.score(ScoreRequest("r", "u0")).items] == ["i2", "i3"]
    # k above k_retrieve widens retrieval instead of returning fewer than asked.
    assert len(scorer.score(ScoreRequest("r", "u0", k=5)).items) == 5
    with pytest.raises(BadRequestError, match="k must be in 1..10000"):
        scorer.score(ScoreRequest("r", "u0", k=0))


def test_fewer_items_than_k_drops_faiss_padding(fakes: Any) -> None:
    scorer = Scorer(StaticLearnerSource(fakes.FakeTwoTower()), IndexHolder(_six_items(fakes)), k_retrieve=50)
    items = scorer.score(ScoreRequest("r", "u0", k=50)).items
    assert sorted(i.item_id for i in items) == [f"i{n}" for n in range(1, 7)]


def test_batch_matches_single_requests(fakes: Any) -> None:
    learner = fakes.FakeTwoTower(prerank={"i1": 0.3, "i2": 0.2, "i3": 0.9, "i5": 0.8})
    scorer = Scorer(StaticLearnerSource(learner), IndexHolder(_six_items(fakes)), k_retrieve=4)
    reqs = [ScoreRequest(f"r{n}", f"u{n % 3}", k=3) for n in range(6)]
    batch = scorer.score_many(reqs)
    singles = [scorer.score(r) for r in reqs]
    assert [b.request_id for b in batch] == [r.request_id for r in reqs]
    assert [[(i.item_id, i.score) for i in b.items] for b in batch] == [
        [(i.item_id, i.score) for i in s.items] for s in singles
    ]
    assert learner.calls[0] == ("encode_users", 6)  # one user-tower call for the batch


def test_not_ready_says_what_is_missing(fakes: Any) -> None:
    holder = IndexHolder()
    source = SwapSource()
    scorer = Scorer(source, holder)
    assert scorer.readiness() == (False, "no model loaded; no index loaded")
    with pytest.raises(NotReadyError, match="no model loaded; no index loaded"):
        scorer.score(ScoreRequest("r", "u0"))
    source.handle = ModelHandle(fakes.FakeTwoTower(), "m", 1)
    assert scorer.readiness() == (False, "no index loaded")
    holder.swap(_six_items(fakes))
    assert scorer.readiness() == (True, "ok")
    assert scorer.score(ScoreRequest("r", "u0")).items


def test_item_features_reach_the_preranker(fakes: Any) -> None:
    seen: list[list[dict]] = []

    class Recording(fakes.FakeTwoTower):  # type: ignore[misc, name-defined]
        def score_candidates(self, user_x, item_xs):  # noqa: ANN001
            seen.append([dict(x) for x in item_xs])
            return super().score_candidates(user_x, item_xs)

    store = ItemFeatureStore()
    store.upsert("i1", {"category": "c7"})
    scorer = Scorer(StaticLearnerSource(Recording()), IndexHolder(_six_items(fakes)), k_retrieve=2, item_xs=store)
    scorer.score(ScoreRequest("r", "u0", user_features={"age": "18-24"}, k=2))
    assert sorted(seen[0], key=lambda x: x["item_id"]) == [{"item_id": "i1", "i:category": "c7"}, {"item_id": "i2"}]


def test_one_index_and_model_version_per_answer_under_concurrent_swaps(fakes: Any) -> None:
    # Index v1 holds a-items, v2 b-items; model version n scores every item n / 10.
    handles = {1: _six_items(fakes, 1, "a"), 2: _six_items(fakes, 2, "b")}
    holder = IndexHolder(handles[1])
    models = {n: ModelHandle(fakes.FakeTwoTower(prerank={f"{p}{i}": n / 10 for p in "ab" for i in range(1, 7)}),
                             "m", n) for n in (1, 2)}
    source = SwapSource(models[1])
    scorer = Scorer(source, holder, k_retrieve=6)
    stop = threading.Event()

    def swapper() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            holder.swap(handles[1 + n % 2])
            source.handle = models[1 + (n // 3) % 2]
            time.sleep(0.0002)

    t = threading.Thread(target=swapper)
    t.start()
    try:
        answers = []
        for _ in range(150):
            answers.extend(scorer.score_many([ScoreRequest("r", f"u{n}", k=6) for n in range(4)]))
    finally:
        stop.set()
        t.join()
    versions = {(a.index_version, a.model_version) for a in answers}
    assert len(versions) > 1, "the swapper never interleaved; the test proves nothing"
    for a in answers:
        prefix = {1: "a", 2: "b"}[a.index_version]
        assert all(i.item_id.startswith(prefix) for i in a.items), a
        assert all(i.score == a.model_version / 10 for i in a.items), a


def test_latency_observed_per_request_and_stage(fakes: Any) -> None:
    reg = CollectorRegistry()
    metrics = Metrics(registry=reg)
    scorer = Scorer(StaticLearnerSource(fakes.FakeTwoTower()), IndexHolder(_six_items(fakes)), metrics=metrics)
    scorer.score_many([ScoreRequest(f"r{n}", "u0") for n in range(5)])
    scorer.score(ScoreRequest("r", "u1"))
    for stage in ("encode", "retrieve", "prerank", "total"):
        assert reg.get_sample_value("towerstream_score_latency_seconds_count", {"stage": stage}) == 6.0
    total = reg.get_sample_value("towerstream_score_latency_seconds_sum", {"stage": "total"})
    parts = sum(reg.get_sample_value("towerstream_score_latency_seconds_sum", {"stage": s})
                for s in ("encode", "retrieve", "prerank"))
    assert total == pytest.approx(parts, rel=1e-6)


# --------------------------------------------------------------------------- checkpoint reloads


def _pickle_loader(path: Path) -> ModelHandle:
    with path.open("rb") as f:
        obj = pickle.load(f)
    return ModelHandle(learner=obj, name="m", version=obj["version"], created_at=obj["created_at"], path=path)


def _write(path: Path, version: int, mtime: float | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps({"version": version, "created_at": 1000.0 + version}))
    os.replace(tmp, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_checkpoint_file_is_reloaded_when_replaced(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    loaded: list[Any] = []
    source = CheckpointLearnerSource(path, loader=_pickle_loader, on_load=lambda h: loaded.append(h.version))
    assert source.current() is None and not source.refresh()
    assert "no checkpoint found" in (source.last_error or "")
    _write(path, 1)
    assert source.refresh() and source.current().version == 1
    held = source.current()
    assert not source.refresh()  # unchanged file: no reload
    _write(path, 2)
    assert source.refresh()
    assert source.current().version == 2
    assert held.version == 1 and held.learner == {"version": 1, "created_at": 1001.0}  # never mutated
    assert loaded == [1, 2]


def test_a_bad_checkpoint_keeps_the_old_model(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    _write(path, 1)
    source = CheckpointLearnerSource(path, loader=_pickle_loader)
    source.refresh()
    tmp = tmp_path / "x"
    tmp.write_bytes(b"not a pickle")
    os.replace(tmp, path)
    assert not source.refresh()
    assert source.current().version == 1
    assert "could not load checkpoint" in (source.last_error or "")
    assert not source.refresh()  # the same bad file is not retried on every poll
    _write(path, 3)
    assert source.refresh() and source.current().version == 3 and source.last_error is None


def test_checkpoint_directory_serves_the_newest_file(tmp_path: Path) -> None:
    now = time.time()
    _write(tmp_path / "a.ckpt", 5, mtime=now - 20)
    _write(tmp_path / "b.ckpt", 6, mtime=now - 10)
    (tmp_path / "c.other").write_bytes(b"ignored: wrong pattern")
    source = CheckpointLearnerSource(tmp_path, loader=_pickle_loader)
    source.refresh()
    assert source.current().version == 6
    _write(tmp_path / "a.ckpt", 7, mtime=now)
    assert source.refresh() and source.current().version == 7


def test_background_polling_picks_up_a_new_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    _write(path, 1)
    source = CheckpointLearnerSource(path, loader=_pickle_loader, poll_interval_s=0.05).start()
    try:
        assert source.current().version == 1
        _write(path, 2)
        deadline = time.monotonic() + 10
        while source.current().version != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert source.current().version == 2
    finally:
        source.stop()
