"""learners.distributed on a real broker: 2 gloo ranks under torchrun learn one model.

Each run is ``torchrun --standalone --nproc-per-node 2 -m app.cli learn --world-size 2``
on a stream already in the topic, so the steps (and the model) are deterministic.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from learners.checkpoint import load_checkpoint
from learners.distributed import assign_partitions
from learners.runtime import StreamLearnerRuntime
from learners.registry import make_learner
from streams.errors import ConfigError
from streams.events import encode_event
from streams.simulator import ClickSimulator, SimulatorConfig
from streams.topics import Topics, key_for_user
from streams.transport import KafkaSettings, TopicPartition, end_offsets, ensure_topics, make_producer

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
LR = ["--learner", "lr", "--param", "bits=16", "--param", 'optimizer="sgd"', "--param", "lr=0.05"]
PARTITIONS = 4

pytestmark = pytest.mark.timeout(300)


def _stream(kafka_bootstrap: str, n: int, seed: int = 3) -> tuple[KafkaSettings, Topics, int]:
    """A fresh topic holding ``n`` simulator events; returns the number of impressions."""
    settings = KafkaSettings(kafka_bootstrap, "kafka-python")
    topics = Topics(prefix=f"ds{uuid.uuid4().hex[:8]}")
    ensure_topics(settings, {topics.events: PARTITIONS, topics.dead_letter: 1})
    sim = ClickSimulator(SimulatorConfig(seed=seed, n_users=300, n_items=120, slate_size=5, target_ctr=0.2))
    events = list(sim.events(max_events=n))
    producer = make_producer(settings)
    for e in events:
        producer.send(topics.events, encode_event(e), key=key_for_user(e.user_id))
    producer.flush(30)
    producer.close()
    return settings, topics, sum(e.kind == "impression" for e in events)


def _learn(settings: KafkaSettings, topics: Topics, ckpt: Path, *extra: str, ranks: int = 2,
           restarts: int = 0) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}", f"--max-restarts={restarts}",
           "--module", "app.cli", "learn", "--world-size", str(ranks), *LR,
           "--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix", topics.prefix,
           "--group", f"g-{topics.prefix}", "--checkpoint", str(ckpt), "--idle-timeout", "3",
           "--batch-size", "100", "--group-timeout", "30", "--no-create-topics", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish(proc: subprocess.Popen, timeout: float = 200) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _ends(settings: KafkaSettings, topics: Topics) -> dict[int, int]:
    ends = end_offsets(settings, [topics.events])
    return {tp.partition: off for tp, off in ends.items()}


def _w_digest(state: dict) -> str:
    # computed here from the checkpoint's own array, not by the code under test
    return hashlib.sha256(np.ascontiguousarray(np.asarray(state["w"], dtype=np.float64)).tobytes()).hexdigest()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_assignment_is_static_and_refuses_too_few_partitions() -> None:
    owned = [assign_partitions(range(5), r, 2) for r in range(2)]
    assert owned == [[0, 2, 4], [1, 3]]
    with pytest.raises(ConfigError, match="3 partitions but 4 ranks"):
        assign_partitions(range(3), 0, 4)


def test_rank_without_its_group_times_out_with_a_message(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "learn", "--world-size", "2", *LR,
                           "--group-timeout", "3", "--bootstrap-servers", "127.0.0.1:1", "--no-create-topics"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not form the group" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr


def _clean_run(settings: KafkaSettings, topics: Topics, ckpt: Path, impressions: int):
    """An uninterrupted 2-rank run over the whole topic; checks it is one model of every partition."""
    ends = _ends(settings, topics)
    assert all(ends[p] > 0 for p in range(PARTITIONS))
    _finish(_learn(settings, topics, ckpt, "--checkpoint-every-n", "300"))
    ck = load_checkpoint(ckpt)
    assert ck.offsets == {topics.events: ends}  # every partition, at its end
    assert ck.events_learned == impressions
    digests = ck.extra["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] == _w_digest(ck.state)
    assert ck.learner().n_learned == impressions  # read back like a single-process checkpoint
    assert np.count_nonzero(ck.state["w"]) > 100
    return ck, ends


@pytest.mark.kafka
def test_two_ranks_end_with_one_model_and_every_partitions_offset(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings, topics, impressions = _stream(kafka_bootstrap, 6000)
    _clean_run(settings, topics, tmp_path / "clean.ckpt", impressions)


@pytest.mark.kafka
def test_sigkill_of_one_rank_then_restart_learns_each_event_once(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings, topics, impressions = _stream(kafka_bootstrap, 6000)
    ck, ends = _clean_run(settings, topics, tmp_path / "clean.ckpt", impressions)

    # the same stream again, in another group, with rank 1 SIGKILLed after the first checkpoint
    killed = tmp_path / "killed.ckpt"
    proc = _learn(settings, topics, killed, "--checkpoint-every-n", "300", "--group", f"k-{topics.prefix}",
                  restarts=1)
    deadline = time.monotonic() + 120
    while not killed.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
        time.sleep(0.05)
    first = load_checkpoint(killed)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)
    _finish(proc)
    ck2 = load_checkpoint(killed)
    assert first.events_learned < impressions  # the kill came mid-stream
    assert ck2.offsets == {topics.events: ends}
    assert ck2.events_learned == impressions  # none lost, none learned twice
    assert ck2.extra["rank_digests"][0] == ck2.extra["rank_digests"][1]
    assert _w_digest(ck2.state) == _w_digest(ck.state)  # the uninterrupted run's model, bit for bit


@pytest.mark.kafka
@pytest.mark.xfail(reason="issue 14 open: 2-rank vs 1-process prequential AUC differ by 0.006-0.017 on this stream (target 0.005): the SGD L2 shrink is applied once per touching rank, and the processes see the partitions in different orders; see the issue note", strict=False)
def test_two_rank_prequential_auc_matches_one_process(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings, topics, impressions = _stream(kafka_bootstrap, 12000, seed=5)
    two = tmp_path / "two.ckpt"
    _finish(_learn(settings, topics, two))
    auc2 = load_checkpoint(two).extra["metrics"]["auc"]
    assert load_checkpoint(two).extra["metrics"]["n"] == impressions

    learner = make_learner("lr", bits=16, optimizer="sgd", lr=0.05)
    one = StreamLearnerRuntime(settings, learner, f"one-{topics.prefix}", topics, tmp_path / "one.ckpt",
                               batch_size=200, idle_timeout_s=3)
    stats = one.run()
    assert stats.events_learned == impressions
    auc1 = stats.metrics["auc"]
    assert 0.6 < auc1 and abs(auc2 - auc1) < 0.005, (auc1, auc2)
