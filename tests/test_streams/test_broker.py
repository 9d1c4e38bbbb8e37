"""The local Kafka broker launcher against a real broker (streams.broker, streams._broker_cli)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streams import broker as broker_mod
from streams.broker import BrokerAlreadyRunningError, BrokerConfig, BrokerError, LocalBroker, ensure_jars, read_status

REPO = Path(__file__).resolve().parents[2]


def _admin(bootstrap: str):  # type: ignore[no-untyped-def]
    from kafka import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-broker")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``towerstream broker ...`` in another process, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "app.cli", "broker", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _roundtrip(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes, int]]:
    """Produce ``records`` (key, value) and read them back from the start; (key, value, partition)."""
    from kafka import KafkaConsumer, KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=30)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"g-{topic}",
                             auto_offset_reset="earliest", consumer_timeout_ms=15000)
    got: list[tuple[bytes, bytes, int]] = []
    for msg in consumer:
        got.append((msg.key, msg.value, msg.partition))
        if len(got) == len(records):
            break
    consumer.close()
    return got


@pytest.mark.kafka
def test_fixture_broker_answers_metadata(kafka_bootstrap: str) -> None:
    admin = _admin(kafka_bootstrap)
    try:
        cluster = admin.describe_cluster()
    finally:
        admin.close()
    assert cluster["brokers"], cluster
    assert cluster["controller_id"] in {b["broker_id"] for b in cluster["brokers"]}


@pytest.mark.kafka
def test_produce_consume_round_trip_keeps_per_key_order(kafka_bootstrap: str, topic_factory) -> None:  # type: ignore[no-untyped-def]
    topic = topic_factory(partitions=3)
    records = [(f"user-{i % 4}".encode(), f"event-{i}".encode()) for i in range(20)]
    got = _roundtrip(kafka_bootstrap, topic, records)
    assert sorted((k, v) for k, v, _ in got) == sorted(records)
    for user in {k for k, _ in records}:
        sent = [v for k, v in records if k == user]
        received = [v for k, v, _ in got if k == user]
        assert received == sent, "one key must keep its order"
        assert len({p for k, _, p in got if k == user}) == 1, "one key must map to one partition"


@pytest.mark.kafka
@pytest.mark.slow
def test_status_and_stop_from_another_process_free_the_port(local_broker_config: BrokerConfig) -> None:
    broker = LocalBroker(local_broker_config)
    bootstrap = broker.start()
    try:
        port = int(bootstrap.rsplit(":", 1)[1])
        assert not _port_is_free(port)
        status = _cli("status", "--data-dir", str(broker.data_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert bootstrap in status.stdout
        stop = _cli("stop", "--data-dir", str(broker.data_dir))
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert broker.status().state == "stopped"
        assert broker._proc is not None and broker._proc.wait(timeout=10) is not None
        assert _port_is_free(port)
        assert _cli("status", "--data-dir", str(broker.data_dir)).returncode == 3
    finally:
        broker.stop()
    assert broker.stop() is False, "stopping a stopped broker is a no-op"


@pytest.mark.kafka
@pytest.mark.slow
def test_same_data_dir_second_start_is_refused_and_restart_keeps_data(local_broker_config: BrokerConfig) -> None:
    with LocalBroker(local_broker_config) as first:
        bootstrap = first.bootstrap
        assert first.start() == bootstrap, "start() on a running broker is idempotent"
        with pytest.raises(BrokerAlreadyRunningError, match="already serves") as info:
            LocalBroker(local_broker_config).start()
        assert info.value.status.bootstrap == bootstrap
        admin = _admin(bootstrap)
        try:
            from kafka.admin import NewTopic

            admin.create_topics([NewTopic(name="kept", num_partitions=2, replication_factor=1)])
        finally:
            admin.close()
        assert _roundtrip(bootstrap, "kept", [(b"k", b"before-restart")])[0][:2] == (b"k", b"before-restart")
    assert read_status(local_broker_config.data_dir).state == "stopped"
    assert _port_is_free(int(bootstrap.rsplit(":", 1)[1])), "stop() frees the client port"
    cluster_id = json.loads((local_broker_config.data_dir / "state.json").read_text())["cluster_id"]
    with LocalBroker(local_broker_config) as again:  # formatted dir: no re-format, same ports, same data
        assert again.bootstrap == bootstrap
        assert json.loads((local_broker_config.data_dir / "state.json").read_text())["cluster_id"] == cluster_id
        from kafka import KafkaConsumer

        consumer = KafkaConsumer("kept", bootstrap_servers=again.bootstrap, group_id="after-restart",
                                 auto_offset_reset="earliest", consumer_timeout_ms=15000)
        values = [next(consumer).value]  # raises StopIteration if nothing arrives in 15 s
        consumer.close()
        assert values == [b"before-restart"]


@pytest.mark.kafka
@pytest.mark.slow
def test_broker_dying_at_start_raises_with_log_tail(local_broker_config: BrokerConfig) -> None:
    from dataclasses import replace

    bad = LocalBroker(replace(local_broker_config, java_opts=("-XX:+TowerstreamNoSuchOption",)))
    with pytest.raises(BrokerError, match="exited with code") as info:
        bad.start()
    assert "TowerstreamNoSuchOption" in str(info.value), "the error carries the broker log tail"
    assert bad.status().state == "stopped"


def test_ensure_jars_second_call_runs_no_subprocess(local_broker_config: BrokerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    libs = ensure_jars(local_broker_config)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"ensure_jars ran a subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    assert ensure_jars(local_broker_config) == libs
    assert list(libs.glob("kafka_2.13-*.jar")) and list(libs.glob("kafka-server-*.jar"))


def test_ensure_jars_reruns_maven_when_a_listed_jar_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libs = tmp_path / "kafka-x" / "libs"
    libs.mkdir(parents=True)
    (libs / ".towerstream-jars.json").write_text(json.dumps({"kafka_version": "9.9.9", "jars": ["gone.jar"]}))
    calls: list[list[str]] = []

    def fake_mvn(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        out = Path(next(a for a in cmd if a.startswith("-DoutputDirectory=")).split("=", 1)[1])
        out.mkdir(parents=True)
        (out / "kafka_2.13-9.9.9.jar").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(broker_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(broker_mod.subprocess, "run", fake_mvn)
    config = BrokerConfig(kafka_version="9.9.9", jar_dir=libs, data_dir=tmp_path / "d")
    assert ensure_jars(config) == libs
    assert len(calls) == 1 and "-Dkafka.version=9.9.9" in calls[0]
    assert (libs / "kafka_2.13-9.9.9.jar").exists() and not (libs / "gone.jar").exists()
    assert ensure_jars(config) == libs and len(calls) == 1, "the new marker makes the next call offline"


def test_missing_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="mvn not found: install Maven"):
        ensure_jars(BrokerConfig(jar_dir=tmp_path / "libs", data_dir=tmp_path / "d"))


def test_bootstrap_or_local_passes_a_given_address_through() -> None:
    with broker_mod.bootstrap_or_local("kafka.example:9092") as bootstrap:
        assert bootstrap == "kafka.example:9092"


@pytest.mark.kafka
@pytest.mark.slow
def test_bootstrap_or_local_starts_a_throwaway_broker_and_stops_it() -> None:
    with broker_mod.bootstrap_or_local(None, prefix="ts-test-broker-") as bootstrap:
        port = int(bootstrap.rsplit(":", 1)[1])
        assert not _port_is_free(port)  # a broker listens there while the block runs
    assert _port_is_free(port)
