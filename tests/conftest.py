"""Suite-wide fixtures: a real Kafka broker and unique topics on it.

``kafka_bootstrap`` (session) yields a bootstrap address, from the first that works:

1. ``KAFKA_BOOTSTRAP_SERVERS`` (an existing cluster);
2. a testcontainers ``KafkaContainer`` when a Docker engine answers;
3. :class:`streams.broker.LocalBroker` on free ports in a temporary directory
   (Maven-resolved jars cached in ``~/.cache/towerstream``).

Without a broker the test is skipped, unless ``TOWERSTREAM_REQUIRE_KAFKA=1``: then it fails.

``movielens_path`` (session) is the shared ml-100k folder (``$TOWERSTREAM_ML100K``, else
``<repo>/../shared/data/ml-100k``); skipped when missing, unless ``TOWERSTREAM_REQUIRE_DATA=1``.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NoReturn

import pytest

if TYPE_CHECKING:
    from streams.broker import BrokerConfig

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]
_DEFAULT_ML100K = _REPO.parent / "shared" / "data" / "ml-100k"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: needs a real Kafka broker (fails instead of skipping "
                                       "when TOWERSTREAM_REQUIRE_KAFKA=1)")


def kafka_unavailable(reason: str) -> NoReturn:
    """Skip, or fail when ``TOWERSTREAM_REQUIRE_KAFKA=1``: a missing broker is never silent in CI."""
    if os.environ.get("TOWERSTREAM_REQUIRE_KAFKA") == "1":
        pytest.fail(f"Kafka required (TOWERSTREAM_REQUIRE_KAFKA=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"no Kafka broker: {reason} (or set KAFKA_BOOTSTRAP_SERVERS to a running broker)")


@pytest.fixture(scope="session")
def movielens_path() -> Path:
    """The ml-100k folder: ``$TOWERSTREAM_ML100K``, else ``<repo>/../shared/data/ml-100k``.

    Skips when the data is not there, unless ``TOWERSTREAM_REQUIRE_DATA=1``: then it fails.
    The shared copy's ``u.data`` is damaged (every ``1`` character lost): load it with
    ``on_bad_line="skip"`` where the surviving lines are good enough.
    """
    path = Path(os.environ.get("TOWERSTREAM_ML100K") or _DEFAULT_ML100K)
    if not (path / "u.data").is_file():
        message = (f"MovieLens ml-100k not found at {path} (no u.data); "
                   "set TOWERSTREAM_ML100K to the unzipped ml-100k folder")
        if os.environ.get("TOWERSTREAM_REQUIRE_DATA") == "1":
            pytest.fail(f"data required (TOWERSTREAM_REQUIRE_DATA=1): {message}", pytrace=False)
        pytest.skip(message)
    return path


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable Docker engine"
        logger.debug("no Docker engine: %r", exc)
        return False


def _local_config(data_dir: Path) -> "BrokerConfig":
    """Config of a LocalBroker on free ports in ``data_dir``, its jars ready (else skip/fail)."""
    from streams.broker import BrokerConfig, BrokerError, ensure_jars, find_java

    config = BrokerConfig.from_env(port=0, controller_port=0, data_dir=data_dir)
    try:
        find_java()
        ensure_jars(config)
        return config
    except BrokerError as exc:
        failure = str(exc)
    kafka_unavailable(failure)


@pytest.fixture
def local_broker_config(tmp_path: Path) -> "BrokerConfig":
    """Config of an isolated, not yet started LocalBroker (free ports, data in ``tmp_path``)."""
    return _local_config(tmp_path / "broker")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address (``host:port``) of a real Kafka broker for this test session."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        container = KafkaContainer(os.environ.get("TOWERSTREAM_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0"))
        try:
            container.start()
        except Exception as exc:  # noqa: BLE001 - report whatever Docker said
            failure = f"testcontainers Kafka failed to start: {exc!r}"
        else:
            failure = ""
        if failure:
            kafka_unavailable(failure)
        try:
            yield container.get_bootstrap_server()
        finally:
            container.stop()
        return
    from streams.broker import BrokerError, LocalBroker

    broker = LocalBroker(_local_config(tmp_path_factory.mktemp("kafka")))
    try:
        bootstrap = broker.start()
    except BrokerError as exc:
        failure = str(exc)
    else:
        failure = ""
    if failure:
        kafka_unavailable(failure)
    try:
        yield bootstrap
    finally:
        broker.stop()


def _leader(partition: dict) -> int:
    """Leader id of a describe_topics partition (kafka-python 3: leader_id; 2.x: leader)."""
    return int(partition.get("leader_id", partition.get("leader", -1)))


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """``make(partitions=4, prefix=None) -> name``: a new, uniquely named topic, deleted afterwards."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="towerstream-tests")
    created: list[str] = []
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", request.node.name)[:80]

    def make(partitions: int = 4, prefix: str | None = None) -> str:
        name = f"{prefix or 'test'}.{stem}.{uuid.uuid4().hex[:8]}"
        admin.create_topics([NewTopic(name=name, num_partitions=partitions, replication_factor=1)])
        created.append(name)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until every partition has a leader
            (desc,) = admin.describe_topics([name])
            parts = desc.get("partitions") or []
            if not desc.get("error_code") and len(parts) == partitions and all(_leader(p) >= 0 for p in parts):
                return name
            time.sleep(0.1)
        raise TimeoutError(f"topic {name} got no leaders within 30s")

    yield make
    try:
        if created:
            admin.delete_topics(created)
    except KafkaError as exc:
        logger.warning("could not delete test topics %s: %r", created, exc)
    finally:
        admin.close()
