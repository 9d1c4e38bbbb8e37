"""learners.runtime on a real broker: prequential learning, checkpoints that carry
offsets, exactly-once learning across SIGKILL, duplicate delivery, graceful stop."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from learners.base import event_to_x
from learners.checkpoint import load_checkpoint, save_checkpoint
from learners.registry import make_learner
from learners.runtime import StreamLearnerRuntime
from streams.deadletter import decode_dead_letter
from streams.errors import ConfigError
from streams.events import Event, decode_event, encode_event
from streams.simulator import ClickSimulator, SimulatorConfig
from streams.topics import Topics, key_for_user
from streams.transport import (
    KafkaSettings,
    Record,
    TopicPartition,
    end_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
)

REPO = Path(__file__).resolve().parents[2]
PROC = Path(__file__).with_name("_learner_proc.py")
_spec = importlib.util.spec_from_file_location("_learner_proc", PROC)
_proc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_proc)
CountingLearner = _proc.CountingLearner

# A hang fails fast, with the stacks, instead of using up the suite's 600 s.
pytestmark = pytest.mark.timeout(180)

FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def _sim_events(n: int, seed: int = 1) -> list[Event]:
    sim = ClickSimulator(SimulatorConfig(seed=seed, n_users=300, n_items=120, slate_size=5, target_ctr=0.2))
    return list(sim.events(max_events=n))


def _setup(kafka_bootstrap: str, partitions: int, events: list[Event], bad: list[bytes] = (),
           client: str = "kafka-python") -> tuple[KafkaSettings, Topics]:
    settings = KafkaSettings(kafka_bootstrap, client, FAST_GROUP)
    topics = Topics(prefix=f"rt{uuid.uuid4().hex[:8]}")
    ensure_topics(settings, {topics.events: partitions, topics.dead_letter: 1})
    _produce(settings, topics, events, bad)
    return settings, topics


def _produce(settings: KafkaSettings, topics: Topics, events: list[Event], bad: list[bytes] = ()) -> None:
    producer = make_producer(settings)
    every = max(1, len(events) // (len(bad) + 1))
    bad = list(bad)
    for i, e in enumerate(events):
        producer.send(topics.events, encode_event(e), key=key_for_user(e.user_id))
        if bad and i % every == every // 2:
            producer.send(topics.events, bad.pop(), key=b"bad")
    assert not bad
    producer.flush(30)
    producer.close()


def _read_topic(settings: KafkaSettings, topic: str, n: int, deadline_s: float = 20) -> list[Record]:
    consumer = make_consumer(settings, None)
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for(topic)])
        got: list[Record] = []
        deadline = time.monotonic() + deadline_s
        while len(got) < n and time.monotonic() < deadline:
            got.extend(consumer.poll(1000, 0.3))
        return got
    finally:
        consumer.close()


def _assert_states_equal(a: Any, b: Any, path: str = "state") -> None:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b), f"{path} differs"  # exact, bit for bit
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _assert_states_equal(a[key], b[key], f"{path}.{key}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class _RecordingMetrics:
    """Prequential metrics stand-in that keeps every (labels, predictions) batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, y_true: np.ndarray, p: np.ndarray) -> None:
        self.batches.append((np.array(y_true), np.array(p)))

    @property
    def n(self) -> int:
        return sum(len(y) for y, _ in self.batches)


# ------------------------------------------------------------------ no broker needed


def test_a_checkpoint_of_another_learner_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, make_learner("ctr", half_life=10), {"t": {0: 3}}, events_learned=3)
    with pytest.raises(ConfigError, match="holds learner"):
        StreamLearnerRuntime(KafkaSettings("localhost:1"), make_learner("ctr", half_life=99), "g",
                             checkpoint_path=path, metrics=_RecordingMetrics())


def test_a_learner_without_spec_cannot_checkpoint(tmp_path: Path) -> None:
    class NoSpec:
        pass

    with pytest.raises(ConfigError, match="no .spec"):
        StreamLearnerRuntime(KafkaSettings("localhost:1"), NoSpec(), "g", checkpoint_path=tmp_path / "m.ckpt",
                             metrics=_RecordingMetrics())


# ------------------------------------------------------------------ real broker


@pytest.mark.kafka
@pytest.mark.parametrize(("client", "learner_name"), [("kafka-python", "lr"), ("confluent", "ctr")])
def test_predicts_before_learning_and_checkpoints_what_it_learned(
    kafka_bootstrap: str, tmp_path: Path, client: str, learner_name: str
) -> None:
    events = _sim_events(1500)
    bad = [b"{broken", orjson.dumps({**orjson.loads(encode_event(events[0])), "schema_version": 7})]
    settings, topics = _setup(kafka_bootstrap, 1, events, bad, client)
    impressions = [e for e in events if e.kind == "impression"]
    params = {"bits": 14} if learner_name == "lr" else {"half_life": 300}
    metrics = _RecordingMetrics()
    ckpt = tmp_path / "m.ckpt"
    runtime = StreamLearnerRuntime(settings, make_learner(learner_name, **params), f"g-{topics.prefix}", topics,
                                   ckpt, batch_size=64, metrics=metrics, idle_timeout_s=1.5,
                                   checkpoint_every_s=None, checkpoint_every_n=500)
    stats = runtime.run()

    assert stats.events_learned == stats.events_learned_run == len(impressions)
    assert stats.skipped == len(events) - len(impressions)  # clicks and requests
    assert stats.dead_lettered == len(bad) and stats.duplicates == 0
    assert stats.records == len(events) + len(bad)
    assert stats.total_lag == 0 and stats.checkpoints >= 2
    dead = [decode_dead_letter(r.value) for r in _read_topic(settings, topics.dead_letter, 2)]
    assert sorted(d.reason for d in dead) == ["json", "schema_version"]

    # Prequential: replaying the same batches offline, predict-then-learn, gives exactly
    # the predictions the runtime reported (learning first would change them).
    offline = make_learner(learner_name, **params)
    i = 0
    for y, p in metrics.batches:
        batch = impressions[i:i + len(y)]
        i += len(y)
        assert np.array_equal(y, [e.label for e in batch])
        xs = [event_to_x(e) for e in batch]
        assert np.array_equal(p, offline.predict_proba_many(xs))
        offline.learn_many(xs, np.array(y))
    assert i == len(impressions)
    _assert_states_equal(runtime.learner.state_dict(), offline.state_dict())

    ck = load_checkpoint(ckpt)
    ends = end_offsets(settings, [topics.events])
    assert ck.offsets == {topics.events: {0: ends[TopicPartition(topics.events, 0)]}}
    assert ck.events_learned == len(impressions)
    _assert_states_equal(ck.state, runtime.learner.state_dict())
    committed = make_consumer(settings, f"g-{topics.prefix}")
    try:
        assert committed.committed(list(ends)) == ends
    finally:
        committed.close()


@pytest.mark.kafka
def test_two_learners_in_their_own_groups_each_learn_everything(kafka_bootstrap: str) -> None:
    events = _sim_events(800, seed=5)
    settings, topics = _setup(kafka_bootstrap, 3, events)
    n_imps = sum(e.kind == "impression" for e in events)
    learned = {}

    def run(name: str) -> None:
        learner = CountingLearner() if name == "test-counter" else make_learner(name)
        rt = StreamLearnerRuntime(settings, learner, f"g-{name}-{topics.prefix}", topics,
                                  batch_size=200, idle_timeout_s=1.5, metrics=_RecordingMetrics())
        learned[name] = rt.run().events_learned

    threads = [threading.Thread(target=run, args=(name,)) for name in ("ctr", "test-counter")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert learned == {"ctr": n_imps, "test-counter": n_imps}


def _start(kafka_bootstrap: str, topics: Topics, group: str, ckpt: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(PROC), "--bootstrap", kafka_bootstrap, "--group", group, "--prefix", topics.prefix,
         "--checkpoint", str(ckpt), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, min_events: int, deadline_s: float = 60) -> int:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            n = load_checkpoint(ckpt).events_learned  # atomic writes: always a whole file
            if n >= min_events:
                return n
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint with {min_events} events: {proc.stderr.read().decode()[-3000:]}"
                         if proc.poll() is not None else f"no checkpoint with {min_events} events in time")


def _finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return orjson.loads(stdout.strip().splitlines()[-1])


@pytest.mark.kafka
@pytest.mark.parametrize(("learner_name", "params"), [("ctr", {"half_life": 200}), ("lr", {"bits": 12})])
def test_sigkill_then_restart_equals_an_uncrashed_run(
    kafka_bootstrap: str, tmp_path: Path, learner_name: str, params: dict
) -> None:
    # One partition and one event per batch: the order and the batches are the same in
    # both runs, so a deterministic learner must end bit-for-bit equal.
    events = _sim_events(1000, seed=11)
    settings, topics = _setup(kafka_bootstrap, 1, events)
    n_imps = sum(e.kind == "impression" for e in events)
    args = ["--learner", learner_name, "--params", orjson.dumps(params).decode(), "--batch-size", "1",
            "--checkpoint-every-n", "37"]

    reference = make_learner(learner_name, **params)
    StreamLearnerRuntime(settings, reference, f"g-ref-{topics.prefix}", topics, tmp_path / "ref.ckpt",
                         batch_size=1, checkpoint_every_n=37, checkpoint_every_s=None, idle_timeout_s=1.5,
                         metrics=_RecordingMetrics()).run()
    assert reference.state_dict()["n_learned"] == n_imps

    ckpt, group = tmp_path / "crash.ckpt", f"g-crash-{topics.prefix}"
    proc = _start(kafka_bootstrap, topics, group, ckpt, *args, "--slow-ms", "4")
    _wait_for_checkpoint(proc, ckpt, min_events=150)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    at_kill = load_checkpoint(ckpt).events_learned
    assert 150 <= at_kill < n_imps  # killed mid-stream

    summary = _finish(_start(kafka_bootstrap, topics, group, ckpt, *args, "--idle-timeout", "1.5"))
    assert summary["resumed_from"] == at_kill
    assert summary["events_learned_run"] == n_imps - at_kill  # nothing learned twice, nothing lost
    final = load_checkpoint(ckpt)
    assert final.events_learned == n_imps
    _assert_states_equal(final.state, reference.state_dict())


@pytest.mark.kafka
def test_sigkill_with_many_partitions_learns_each_event_exactly_once(kafka_bootstrap: str, tmp_path: Path) -> None:
    events = _sim_events(4000, seed=3)
    settings, topics = _setup(kafka_bootstrap, 4, events)
    imps = [e for e in events if e.kind == "impression"]
    truth: dict[str, list[int]] = {}
    for e in imps:
        c = truth.setdefault(e.item_id, [0, 0])
        c[0] += 1
        c[1] += e.label
    args = ["--learner", "test-counter", "--batch-size", "100", "--checkpoint-every-n", "150"]
    ckpt, group = tmp_path / "c.ckpt", f"g-{topics.prefix}"

    proc = _start(kafka_bootstrap, topics, group, ckpt, *args, "--slow-ms", "40")
    _wait_for_checkpoint(proc, ckpt, min_events=300)
    time.sleep(0.1)  # kill between checkpoints: some learned events are in no checkpoint yet
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    at_kill = load_checkpoint(ckpt).events_learned
    assert at_kill < len(imps)

    summary = _finish(_start(kafka_bootstrap, topics, group, ckpt, *args, "--idle-timeout", "1.5"))
    assert summary["events_learned_run"] == len(imps) - at_kill
    final = load_checkpoint(ckpt)
    assert final.state == {"counts": truth, "n_learned": len(imps)}
    assert final.offsets == {topics.events: {tp.partition: end for tp, end in
                                             end_offsets(settings, [topics.events]).items()}}


class _ReplayingConsumer:
    """Wraps a consumer so that every seek goes back to offset 0: the broker "re-delivers"
    everything the checkpoint already holds."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))
        self._inner.seek(partition, 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.kafka
def test_duplicate_delivery_is_not_learned_twice(kafka_bootstrap: str, tmp_path: Path) -> None:
    events = _sim_events(900, seed=8)
    settings, topics = _setup(kafka_bootstrap, 2, events)
    n_first = sum(e.kind == "impression" for e in events)
    ckpt = tmp_path / "ctr.ckpt"

    def runtime(group: str, wrap: bool) -> StreamLearnerRuntime:
        factory = None
        if wrap:
            def factory(s: KafkaSettings, g: str, n: int) -> Any:
                consumer = _ReplayingConsumer(make_consumer(s, g, max_poll_records=n))
                wrappers.append(consumer)
                return consumer
        return StreamLearnerRuntime(settings, make_learner("ctr"), group, topics, ckpt, batch_size=128,
                                    idle_timeout_s=1.5, consumer_factory=factory, metrics=_RecordingMetrics())

    wrappers: list[_ReplayingConsumer] = []
    first = runtime(f"g1-{topics.prefix}", wrap=False)
    assert first.run().events_learned == n_first
    state_after_first = first.learner.state_dict()

    # A new group (no committed offsets) whose consumer re-delivers from offset 0.
    again = runtime(f"g2-{topics.prefix}", wrap=True)
    stats = again.run()
    assert sorted(tp.partition for tp, _ in wrappers[0].seeks) == [0, 1]  # it did seek to the checkpoint
    assert stats.events_learned_run == 0 and stats.events_learned == n_first
    assert stats.duplicates == len(events)  # every record came again and was skipped
    _assert_states_equal(again.learner.state_dict(), state_after_first)

    more = _sim_events(1300, seed=8)[900:]  # the stream continues
    _produce(settings, topics, more)
    third = runtime(f"g2-{topics.prefix}", wrap=True)
    stats = third.run()
    n_more = sum(e.kind == "impression" for e in more)
    assert stats.events_learned_run == n_more and stats.events_learned == n_first + n_more
    assert third.learner.state_dict()["n_learned"] == n_first + n_more


@pytest.mark.kafka
def test_sigterm_finishes_the_batch_checkpoints_and_exits_0(kafka_bootstrap: str, tmp_path: Path) -> None:
    events = _sim_events(3000, seed=4)
    settings, topics = _setup(kafka_bootstrap, 2, events)
    ckpt, group = tmp_path / "t.ckpt", f"g-{topics.prefix}"
    proc = _start(kafka_bootstrap, topics, group, ckpt, "--learner", "test-counter", "--batch-size", "50",
                  "--checkpoint-every-n", "200", "--slow-ms", "30")
    _wait_for_checkpoint(proc, ckpt, min_events=200)
    proc.send_signal(signal.SIGTERM)
    summary = _finish(proc)
    assert 0 < summary["events_learned_run"] < sum(e.kind == "impression" for e in events)

    ck = load_checkpoint(ckpt)
    assert ck.events_learned == summary["events_learned"]
    # The checkpoint's offsets cover exactly the impressions it counts.
    records = _read_topic(settings, topics.events, len(events))
    below = [decode_event(r.value) for r in records if r.offset < ck.offsets[topics.events].get(r.partition, 0)]
    imps_below = [e for e in below if e.kind == "impression"]
    assert ck.state["n_learned"] == len(imps_below) == ck.events_learned
    assert ck.state["counts"] == {k: list(v) for k, v in _counts(imps_below).items()}
    consumer = make_consumer(settings, group)
    try:
        tps = [TopicPartition(topics.events, p) for p in (0, 1)]
        assert consumer.committed(tps) == {tp: ck.offsets[topics.events].get(tp.partition) for tp in tps}
    finally:
        consumer.close()


def _counts(imps: list[Event]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e in imps:
        c = out.setdefault(e.item_id, [0, 0])
        c[0] += 1
        c[1] += e.label
    return out


@pytest.mark.kafka
@pytest.mark.parametrize("client", ["kafka-python", "confluent", "confluent-cooperative"])
def test_revocation_checkpoints_and_commits_before_giving_partitions_up(
    kafka_bootstrap: str, tmp_path: Path, client: str
) -> None:
    events = _sim_events(1200, seed=6)
    settings, topics = _setup(kafka_bootstrap, 2, events, client=client.removesuffix("-cooperative"))
    if client == "confluent-cooperative":  # incremental rebalancing: only the moved partition is revoked
        settings = KafkaSettings(kafka_bootstrap, "confluent",
                                 {**FAST_GROUP, "partition.assignment.strategy": "cooperative-sticky"})
    group, ckpt = f"g-{topics.prefix}", tmp_path / "a.ckpt"
    learner = _proc._Slow(CountingLearner(), 0.05)  # about 400 records/s: B joins mid-stream
    a = StreamLearnerRuntime(settings, learner, group, topics, ckpt, batch_size=20, checkpoint_every_s=None,
                             checkpoint_every_n=None, metrics=_RecordingMetrics())
    thread = threading.Thread(target=a.run)
    thread.start()
    b = None
    try:
        deadline = time.monotonic() + 20
        while len(a.learned_offsets) < 2 and time.monotonic() < deadline:  # some of both partitions
            time.sleep(0.05)
        assert len(a.learned_offsets) == 2 and not ckpt.exists()

        # A second member joins: A must checkpoint and commit what it learned, then let go.
        b = make_consumer(settings, group, [topics.events])
        got: list[Record] = []
        deadline = time.monotonic() + 30
        while not b.assignment() and time.monotonic() < deadline:
            got.extend(b.poll(500, 0.2))
        mine = sorted(b.assignment())
        assert len(mine) == 1
        ck = load_checkpoint(ckpt)
        assert ck.extra["reason"] == "revoke"
        start = ck.offsets[topics.events][mine[0].partition]
        assert b.committed(mine) == {mine[0]: start}
        end = end_offsets(settings, [topics.events])[mine[0]]
        deadline = time.monotonic() + 10
        while not got and start < end and time.monotonic() < deadline:
            got.extend(b.poll(500, 0.2))
        # B goes on exactly where A's model stopped (or has nothing left to read)
        assert got[0].offset == start if start < end else not got
    finally:
        a.stop()
        thread.join(30)
        if b is not None:
            b.close()
    final = load_checkpoint(ckpt)
    assert final.events_learned == a.stats().events_learned == learner.n_learned


# ------------------------------------------------------------------ the `learn` command


def _learn(argv: list[str]) -> int:
    import argparse

    from learners import _learn_cli

    parser = argparse.ArgumentParser()
    _learn_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["learn", *argv])
    return args.func(args)


def test_learn_params_parse_json_or_keep_strings() -> None:
    from learners._learn_cli import _params

    assert _params(["bits=18", "optimizer=ftrl", 'categorical=["ctx:position"]', "alpha=0.5"]) == {
        "bits": 18, "optimizer": "ftrl", "categorical": ["ctx:position"], "alpha": 0.5}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        _params(["bits"])


def test_learn_needs_a_learner_or_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--learner is required"):
        _learn(["--bootstrap-servers", "localhost:1", "--checkpoint", str(tmp_path / "none.ckpt")])
    with pytest.raises(ConfigError, match="--batch-size"):
        _learn(["--learner", "ctr", "--bootstrap-servers", "localhost:1", "--batch-size", "0"])
    with pytest.raises(ConfigError, match="--threads must be >= 1, got 0"):
        _learn(["--learner", "ctr", "--bootstrap-servers", "localhost:1", "--threads", "0"])


@pytest.mark.kafka
def test_learn_command_learns_checkpoints_and_resumes(kafka_bootstrap: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    events = _sim_events(1000, seed=9)
    settings, topics = _setup(kafka_bootstrap, 2, events)
    n_imps = sum(e.kind == "impression" for e in events)
    ckpt = tmp_path / "cli.ckpt"
    common = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", topics.prefix, "--checkpoint", str(ckpt),
              "--group", f"g-{topics.prefix}", "--batch-size", "100", "--quiet",
              "--default-gc"]  # tune_gc is process-wide: not inside the test session
    assert _learn([*common, "--learner", "ctr", "--param", "half_life=300", "--max-events", "250"]) == 0
    first = load_checkpoint(ckpt)
    assert first.events_learned == 250 and first.spec["params"]["half_life"] == 300.0
    assert "250 events this run" in capsys.readouterr().out

    # No --learner: the checkpoint's learner and params; the rest of the stream.
    assert _learn([*common, "--kafka-client", "confluent", "--idle-timeout", "1.5"]) == 0
    final = load_checkpoint(ckpt)
    assert final.events_learned == n_imps and final.spec == first.spec
    assert f"{n_imps - 250:,} events this run" in capsys.readouterr().out
