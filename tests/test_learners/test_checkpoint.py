"""learners.checkpoint: round trips, atomic replacement, clear errors."""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from learners.checkpoint import (
    CheckpointError,
    flat_offsets,
    load_checkpoint,
    nest_offsets,
    restore_learner,
    save_checkpoint,
)
from learners.registry import make_learner


def _xs(n: int) -> tuple[list[dict], np.ndarray]:
    rng = np.random.default_rng(3)
    xs = [{"user_id": f"u{rng.integers(20)}", "item_id": f"i{rng.integers(30)}", "u:age": "25-34",
           "i:genres": ("Drama",), "ctx:position": int(rng.integers(5))} for _ in range(n)]
    ys = (rng.random(n) < 0.3).astype(np.int64)
    return xs, ys


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize(("name", "params"), [("ctr", {"half_life": 50}), ("lr", {"bits": 12})])
def test_round_trip_rebuilds_an_identical_learner(tmp_path: Path, name: str, params: dict) -> None:
    learner = make_learner(name, **params)
    xs, ys = _xs(300)
    learner.learn_many(xs, ys)
    path = tmp_path / "sub" / "model.ckpt"
    offsets = {"towerstream.events": {0: 120, 3: 180}}
    save_checkpoint(path, learner, offsets, events_learned=300, extra={"group_id": "g"}, clock=lambda: 1234.5)

    ck = load_checkpoint(path)
    assert ck.spec == learner.spec
    assert ck.offsets == offsets and ck.events_learned == 300 and ck.created_at == 1234.5
    assert ck.extra == {"group_id": "g"}
    restored = restore_learner(ck)
    _assert_states_equal(restored.state_dict(), learner.state_dict())
    probe, _ = _xs(50)
    assert np.array_equal(restored.predict_proba_many(probe), learner.predict_proba_many(probe))
    # and both continue identically
    more, more_y = _xs(40)
    restored.learn_many(more, more_y)
    learner.learn_many(more, more_y)
    _assert_states_equal(restored.state_dict(), learner.state_dict())


class _TensorLearner:
    spec = {"name": "tensor-test", "params": {"dim": 3}}

    def __init__(self) -> None:
        import torch

        self.weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)

    def state_dict(self) -> dict:
        return {"weight": self.weight.clone(), "np": np.ones(4, dtype=np.float32)}


def test_torch_tensors_and_numpy_arrays_survive(tmp_path: Path) -> None:
    import torch

    learner = _TensorLearner()
    save_checkpoint(tmp_path / "t.ckpt", learner, {}, events_learned=0)
    state = load_checkpoint(tmp_path / "t.ckpt").state
    assert torch.equal(state["weight"], learner.weight)
    assert state["np"].dtype == np.float32 and np.array_equal(state["np"], np.ones(4))


class _Broken:
    spec = {"name": "broken", "params": {}}

    def state_dict(self) -> dict:
        return {"lock": threading.Lock()}  # cannot be pickled


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_debris(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    good = make_learner("ctr")
    save_checkpoint(path, good, {"t": {0: 5}}, events_learned=5)
    before = path.read_bytes()
    with pytest.raises((TypeError, pickle.PicklingError)):
        save_checkpoint(path, _Broken(), {"t": {0: 9}}, events_learned=9)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.ckpt"]
    assert load_checkpoint(path).offsets == {"t": {0: 5}}


def test_readers_never_see_a_partial_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    learner = make_learner("lr", bits=14)  # a state of a few hundred kB
    save_checkpoint(path, learner, {"t": {0: 0}}, events_learned=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            save_checkpoint(path, learner, {"t": {0: i}}, events_learned=i)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    reads, deadline = 0, time.monotonic() + 30.0
    try:
        # at least 200 reads, and on until the writer has replaced the file (a busy machine
        # can starve the writer thread for a while)
        while reads < 200 or (len(seen) < 2 and time.monotonic() < deadline):
            reads += 1
            try:
                ck = load_checkpoint(path)
            except CheckpointError as exc:  # would be a torn read
                errors.append(exc)
                break
            assert ck.offsets["t"][0] == ck.events_learned
            seen.add(ck.events_learned)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert len(seen) > 1  # the file really was being replaced while we read it


def test_learner_without_spec_is_refused(tmp_path: Path) -> None:
    class NoSpec:
        def state_dict(self) -> dict:
            return {}

    with pytest.raises(CheckpointError, match="has no .spec"):
        save_checkpoint(tmp_path / "x.ckpt", NoSpec(), {}, events_learned=0)


@pytest.mark.parametrize("offsets", [{"t": {0: -1}}, {"t": {"zero": 1}}, {"t": {0: 1.5}}, {3: {0: 1}}])
def test_bad_offsets_are_refused(tmp_path: Path, offsets: dict) -> None:
    with pytest.raises(CheckpointError, match="offset"):
        save_checkpoint(tmp_path / "x.ckpt", make_learner("ctr"), offsets, events_learned=0)


def test_unreadable_files_raise_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x05 definitely not a pickle")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    other = tmp_path / "other.ckpt"
    other.write_bytes(pickle.dumps({"some": "dict"}))
    with pytest.raises(CheckpointError, match="not a towerstream learner checkpoint"):
        load_checkpoint(other)
    future = tmp_path / "future.ckpt"
    future.write_bytes(pickle.dumps({"format": "towerstream-learner-checkpoint", "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(future)


def test_offset_shapes_convert_both_ways() -> None:
    flat = {("a", 1): 10, ("a", 0): 4, ("b", 2): 7}
    assert nest_offsets(flat) == {"a": {0: 4, 1: 10}, "b": {2: 7}}
    assert flat_offsets(nest_offsets(flat)) == flat


def test_a_two_tower_built_by_hand_resumes_from_its_own_checkpoint(tmp_path) -> None:
    # a fresh two-tower infers its fields from the first batch, so its spec says None where its
    # checkpoint names them: resuming must accept that (and still refuse another learner)
    import numpy as np

    from learners.checkpoint import save_checkpoint
    from learners.registry import make_learner
    from learners.runtime import StreamLearnerRuntime
    from streams.errors import ConfigError
    from streams.transport import KafkaSettings

    trained = make_learner("two-tower", out_dim=8, hidden=(8,), field_dim=4, seed=0)
    xs = [{"user_id": f"u{n % 5}", "u:age": "a", "item_id": f"i{n % 7}", "i:genre": "g"} for n in range(64)]
    trained.learn_many(xs, np.arange(64) % 2)
    path = tmp_path / "tt.ckpt"
    save_checkpoint(path, trained, {"events": {0: 64}}, events_learned=64)
    fresh = make_learner("two-tower", out_dim=8, hidden=(8,), field_dim=4, seed=0)
    rt = StreamLearnerRuntime(KafkaSettings("127.0.0.1:1"), fresh, "g", checkpoint_path=path)
    assert rt.resumed_from is not None and rt.resumed_from.events_learned == 64
    assert fresh.predict_proba_many(xs[:4]).tolist() == trained.predict_proba_many(xs[:4]).tolist()
    other = make_learner("two-tower", out_dim=16, hidden=(8,), field_dim=4, seed=0)
    with pytest.raises(ConfigError, match="holds learner"):
        StreamLearnerRuntime(KafkaSettings("127.0.0.1:1"), other, "g", checkpoint_path=path)
