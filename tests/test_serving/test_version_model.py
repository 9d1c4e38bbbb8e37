"""The served model of an index version (``serve --model-from index``)."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import indexer.item_follow as item_follow
import learners.checkpoint
from indexer import ArtifactStore
from indexer.item_follow import VersionLearner, version_learner, version_tower
from serving.app import ServeConfig, ServingApp
from serving.scorer import ScoreRequest
from serving.version_model import VersionLearnerSource
from streams.errors import ConfigError


class Holder:
    def __init__(self) -> None:
        self.current: Any = None


def _base(version: int) -> Any:
    return SimpleNamespace(version=version, path=None, manifest={})


def _loaded(tag: str) -> VersionLearner:
    return VersionLearner(learner=tag, name="tt", events_learned=len(tag), created_at=0.0, path=Path(tag),
                          sha256=tag)


def test_the_model_follows_the_served_version_and_is_loaded_once_per_version() -> None:
    holder, calls = Holder(), []
    towers = {1: _loaded("one"), 2: _loaded("two"), 3: None}

    def load(base: Any) -> VersionLearner | None:
        calls.append(base.version)
        return towers[base.version]

    prepared: list[tuple[str, int]] = []
    source = VersionLearnerSource(holder, load=load, prepare=lambda m, b: prepared.append((m.learner, b.version)))
    assert source.current() is None and "no index version" in (source.last_error or "")
    v1, v2, v3 = _base(1), _base(2), _base(3)
    source.load_for(v1)
    holder.current = v1
    assert source.current().learner == "one"
    source.load_for(v2)  # loaded before the swap: the served version keeps its own model until then
    assert source.current().learner == "one"
    holder.current = v2
    assert source.current().learner == "two"
    holder.current = v1  # a rollback finds its model still loaded
    assert source.current().learner == "one"
    source.load_for(v1)
    assert calls == [1, 2]
    assert prepared == [("one", 1), ("two", 2)]  # prepared with the version it will serve
    source.load_for(v3)  # a version without a tower: the newest model goes on serving
    holder.current = v3
    assert source.current().learner == "two"
    assert "keeps no model" in (source.last_error or "") and "--model-from checkpoint" in source.last_error


def test_a_version_tower_is_unpickled_once_for_the_model_and_the_item_deltas(trained_artifacts: Any,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(item_follow, "_TOWERS", OrderedDict())
    parsed = []
    real = learners.checkpoint.checkpoint_from_bytes

    def counting(data: bytes, where: str = "checkpoint bytes") -> Any:
        parsed.append(where)
        return real(data, where)

    monkeypatch.setattr(learners.checkpoint, "checkpoint_from_bytes", counting)
    from indexer.handle import load_handle

    store = ArtifactStore(trained_artifacts.index_root)
    base = load_handle(store.version_dir(store.current()))
    model = version_learner(base)
    encode_items = version_tower(base)
    assert model is not None and encode_items is not None
    assert encode_items.__self__ is model.learner  # one object serves both
    assert len(parsed) == 1
    assert model.events_learned == trained_artifacts.events_learned and model.name == "two-tower"


def _answers(app: ServingApp, users: list[str]) -> list[Any]:
    deadline = time.monotonic() + 30
    while not app.scorer.readiness()[0]:
        assert time.monotonic() < deadline, app.scorer.readiness()[1]
        time.sleep(0.05)
    return app.scorer.score_many([ScoreRequest(request_id=f"r{n}", user_id=u, k=10) for n, u in enumerate(users)])


def test_serving_the_versions_model_answers_as_the_checkpoint_it_was_built_from(trained_artifacts: Any) -> None:
    art = trained_artifacts
    users = [f"u{n}" for n in range(0, 200, 7)]
    out = {}
    for mode in ("index", "checkpoint"):
        app = ServingApp(ServeConfig(index_root=art.index_root, checkpoint=art.checkpoint if mode == "checkpoint"
                                     else None, kafka=None, host="127.0.0.1", port=0, catalogue=art.catalogue),
                         registry=CollectorRegistry())
        assert app.config.model_from == mode
        try:
            app.start()
            out[mode] = _answers(app, users)
            if mode == "index":
                assert app.models.current().path == app.holder.current.path / "tower.ckpt"
        finally:
            app.stop()
    for a, b in zip(out["index"], out["checkpoint"]):
        assert (a.index_version, a.model_version, a.learner) == (b.index_version, b.model_version, b.learner)
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items] and len(a.items) == 10
        assert [i.score for i in a.items] == pytest.approx([i.score for i in b.items], abs=1e-6)


def test_model_from_checkpoint_without_a_checkpoint_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--checkpoint PATH"):
        ServeConfig(index_root=tmp_path, model_from="checkpoint")
    with pytest.raises(ConfigError, match="index or checkpoint"):
        ServeConfig(index_root=tmp_path, model_from="newest")
