"""Kafka clients behind one small interface: kafka-python (default) or confluent-kafka.

Everything in towerstream that talks to Kafka goes through :func:`make_producer`,
:func:`make_consumer` and :func:`ensure_topics`, configured by one frozen
:class:`KafkaSettings`. Code above this module never imports a Kafka client, so the
client is a setting, not a code path.

* ``kafka-python`` (pure Python, always installed) is the default.
* ``confluent-kafka`` (librdkafka; ``pip install 'towerstream[confluent]'``) is several
  times faster per consumer process; it is imported only when asked for.

``KafkaSettings.options`` pass straight through to the client. Write them with
kafka-python's names (``security_protocol``, ``sasl_mechanism``,
``sasl_plain_username``, ``ssl_cafile``, ...); for confluent-kafka they are
translated to librdkafka's dotted names (``security.protocol``, ``sasl.username``,
``ssl.ca.location``, ...). A dotted name is passed to confluent-kafka as it is.

Offsets are always *next* offsets (the offset of the next record to read), as Kafka
commits them. Partitions are :class:`TopicPartition` tuples.

>>> s = KafkaSettings("localhost:9092", options={"security_protocol": "SASL_SSL",
...                   "sasl_plain_username": "me", "ssl_cafile": "/ca.pem"})
>>> sorted(_confluent_options(s.options).items())
[('sasl.username', 'me'), ('security.protocol', 'SASL_SSL'), ('ssl.ca.location', '/ca.pem')]
>>> KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
...                         "TOWERSTREAM_KAFKA_CLIENT": "confluent"}).client
'confluent'
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Optional, Protocol, Sequence

import orjson

from streams.errors import ConfigError, StreamsError

__all__ = [
    "ClientName",
    "CLIENTS",
    "KafkaSettings",
    "KafkaTransportError",
    "TopicPartition",
    "Record",
    "Producer",
    "Consumer",
    "RebalanceCallback",
    "make_producer",
    "make_consumer",
    "ensure_topics",
    "end_offsets",
]

log = logging.getLogger(__name__)

ClientName = Literal["kafka-python", "confluent"]
CLIENTS: tuple[str, ...] = ("kafka-python", "confluent")

ENV_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"
ENV_CLIENT = "TOWERSTREAM_KAFKA_CLIENT"
ENV_OPTIONS = "TOWERSTREAM_KAFKA_OPTIONS"


# Longest a blocking client call (commit, committed, end offsets, close) may take before it
# fails with KafkaTransportError instead of hanging.
_TIMEOUT_MS = 30_000


class KafkaTransportError(StreamsError):
    """Kafka did not do what was asked (delivery failed, commit refused, timeout)."""


@dataclass(frozen=True)
class KafkaSettings:
    """Where the Kafka cluster is and which client talks to it.

    Parameters
    ----------
    bootstrap_servers
        ``host:port[,host:port...]``.
    client
        ``"kafka-python"`` (default) or ``"confluent"``.
    options
        Passed through to the client: security (``security_protocol``, ``sasl_*``,
        ``ssl_*``) and tuning. kafka-python names; translated for confluent-kafka.
    """

    bootstrap_servers: str
    client: ClientName = "kafka-python"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap_servers, str) or not self.bootstrap_servers.strip():
            raise ConfigError(
                "Kafka bootstrap servers are empty: pass host:port (e.g. localhost:9092) "
                f"or set {ENV_BOOTSTRAP}"
            )
        if self.client not in CLIENTS:
            raise ConfigError(f"unknown Kafka client {self.client!r}: use one of {', '.join(CLIENTS)}")
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise ConfigError("Kafka options must be a mapping of option name -> value")
        object.__setattr__(self, "options", dict(self.options))
        if self.client == "kafka-python":
            _kafka_python_options(self.options, "all")  # fail fast on an unknown option

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, default_bootstrap: str | None = None
    ) -> "KafkaSettings":
        """Read ``KAFKA_BOOTSTRAP_SERVERS``, ``TOWERSTREAM_KAFKA_CLIENT`` and
        ``TOWERSTREAM_KAFKA_OPTIONS`` (a JSON object of client options)."""
        env = os.environ if environ is None else environ
        bootstrap = env.get(ENV_BOOTSTRAP) or default_bootstrap
        if not bootstrap:
            raise ConfigError(f"{ENV_BOOTSTRAP} is not set: export {ENV_BOOTSTRAP}=host:port (e.g. localhost:9092)")
        client = env.get(ENV_CLIENT) or "kafka-python"
        if client not in CLIENTS:
            raise ConfigError(f"{ENV_CLIENT}={client!r} is not a Kafka client: use one of {', '.join(CLIENTS)}")
        options: Any = {}
        raw = env.get(ENV_OPTIONS)
        if raw:
            try:
                options = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ConfigError(
                    f"{ENV_OPTIONS} is not valid JSON ({exc}); write an object such as "
                    '\'{"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}\''
                ) from None
            if not isinstance(options, dict):
                raise ConfigError(
                    f"{ENV_OPTIONS} must be a JSON object of option -> value, got {type(options).__name__}"
                )
        return cls(bootstrap_servers=bootstrap, client=client, options=options)  # type: ignore[arg-type]

    def with_client(self, client: ClientName) -> "KafkaSettings":
        """The same cluster through another client."""
        return KafkaSettings(self.bootstrap_servers, client, self.options)


class TopicPartition(NamedTuple):
    """One partition of one topic."""

    topic: str
    partition: int


class Record(NamedTuple):
    """One consumed Kafka record (immutable; a NamedTuple because one is built per record
    on the hot path and a tuple costs a quarter of a frozen dataclass to build).

    ``timestamp`` is the record timestamp in milliseconds since the epoch (-1 if none).
    """

    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    timestamp: int


RebalanceCallback = Callable[[list[TopicPartition]], None]


class Producer(Protocol):
    """Sends records; :meth:`flush` waits for them and raises if any was not delivered."""

    def send(self, topic: str, value: bytes, key: bytes | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...


class Consumer(Protocol):
    """Polls records of a group (``subscribe``) or of chosen partitions (``assign``).

    Auto-commit is always off: the caller commits next offsets after handling.
    Rebalance callbacks run during :meth:`poll` (and :meth:`close`). Inside one, call
    only :meth:`commit`, :meth:`seek` and :meth:`assignment`: ``seek`` in ``on_assigned``
    sets where a partition starts, ``commit`` in ``on_revoked`` completes before the
    partitions are given up. kafka-python 3 runs callbacks on its IO thread, where other
    blocking calls (``end_offsets``, ``committed``, ``position``) raise
    :class:`KafkaTransportError`.
    """

    group_id: str | None

    def subscribe(self, topics: Sequence[str], *, on_assigned: RebalanceCallback | None = None,
                  on_revoked: RebalanceCallback | None = None) -> None: ...

    def assign(self, partitions: Iterable[TopicPartition]) -> None: ...

    def assignment(self) -> frozenset[TopicPartition]: ...

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def position(self, partition: TopicPartition) -> int | None: ...

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]: ...

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...

    def end_offsets(self, partitions: Iterable[TopicPartition], *,
                    cached: bool = False) -> dict[TopicPartition, int]: ...

    def partitions_for(self, topic: str) -> list[int]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- options

# kafka-python name -> librdkafka name, where the generic "_" -> "." rule is wrong.
_CONFLUENT_NAMES = {
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "ssl_ciphers": "ssl.cipher.suites",
}
_KAFKA_PYTHON_NAMES = {v: k for k, v in _CONFLUENT_NAMES.items()}


def _confluent_options(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "ssl_check_hostname":
            out["ssl.endpoint.identification.algorithm"] = "https" if value else "none"
        elif "." in name:
            out[name] = value
        else:
            out[_CONFLUENT_NAMES.get(name, name.replace("_", "."))] = value
    return out


def _kafka_python_options(options: Mapping[str, Any], role: str) -> dict[str, Any]:
    """Options for one kafka-python class (``producer``, ``consumer``, ``admin``): an
    option that belongs to another class is left out; one no class knows is an error."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    known = {
        "producer": set(KafkaProducer.DEFAULT_CONFIG),
        "consumer": set(KafkaConsumer.DEFAULT_CONFIG),
        "admin": set(KafkaAdminClient.DEFAULT_CONFIG),
    }
    out: dict[str, Any] = {}
    for name, value in options.items():
        py_name = _KAFKA_PYTHON_NAMES.get(name, name.replace(".", "_"))
        if not any(py_name in names for names in known.values()):
            raise ConfigError(
                f"unknown kafka-python option {name!r}: see the KafkaConsumer/KafkaProducer docs "
                "for valid names (or use client='confluent' for librdkafka options)"
            )
        if role == "all" or py_name in known[role]:
            out[py_name] = value
    return out


def _confluent_module() -> Any:
    try:
        import confluent_kafka
    except ImportError:
        raise ConfigError(
            "the 'confluent' Kafka client needs confluent-kafka: pip install 'towerstream[confluent]' "
            "(or use client='kafka-python')"
        ) from None
    return confluent_kafka


# --------------------------------------------------------------------------- kafka-python


class _KPProducer:
    def __init__(self, settings: KafkaSettings, linger_ms: float = 5.0) -> None:
        from kafka import KafkaProducer

        config: dict[str, Any] = {"acks": "all", "linger_ms": int(linger_ms), "batch_size": 256 * 1024,
                                  "retries": 5}
        config.update(_kafka_python_options(settings.options, "producer"))
        self._p = KafkaProducer(bootstrap_servers=settings.bootstrap_servers.split(","), **config)
        self._errors: list[BaseException] = []

    def _on_error(self, exc: BaseException) -> None:
        self._errors.append(exc)

    def send(self, topic: str, value: bytes, key: bytes | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None) -> None:
        future = self._p.send(topic, value=value, key=key, headers=list(headers) if headers else None)
        future.add_errback(self._on_error)

    def flush(self, timeout: float | None = None) -> None:
        try:
            self._p.flush(timeout=timeout)
        except Exception as exc:  # kafka-python raises KafkaTimeoutError and friends
            raise KafkaTransportError(f"producer flush did not complete within {timeout} s: {exc}") from exc
        if self._errors:
            first, n = self._errors[0], len(self._errors)
            self._errors.clear()
            raise KafkaTransportError(f"{n} record(s) were not delivered; first error: {first!r}")

    def close(self) -> None:
        self._p.close()


try:  # kafka-python >= 3: listeners may be coroutines, awaited on the IO thread
    from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener as _KP_ASYNC_LISTENER
except ImportError:  # kafka-python 2.x: listeners run inside poll() on the caller's thread
    _KP_ASYNC_LISTENER = None


def _kafka_python_listener(owner: "_KPConsumer", on_assigned: RebalanceCallback | None,
                           on_revoked: RebalanceCallback | None) -> Any:
    """A kafka-python rebalance listener calling our callbacks with TopicPartition lists."""

    async def await_commits(deferred: list[Any]) -> None:
        for future, offsets in deferred:
            try:
                await future
            except Exception as exc:  # the next owner re-reads from the last good commit
                log.warning("commit of %s during a rebalance failed: %s", _fmt_offsets(offsets), exc)

    if _KP_ASYNC_LISTENER is not None:

        class _Async(_KP_ASYNC_LISTENER):  # type: ignore[misc, valid-type]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await await_commits(owner._call_listener(on_revoked, revoked))

            async def on_partitions_assigned(self, assigned: Any) -> None:
                await await_commits(owner._call_listener(on_assigned, assigned))

        return _Async()

    from kafka.consumer.subscription_state import ConsumerRebalanceListener

    class _Sync(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            owner._call_listener(on_revoked, revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            owner._call_listener(on_assigned, assigned)

    return _Sync()


class _KPConsumer:
    def __init__(self, settings: KafkaSettings, group_id: str | None, max_poll_records: int, *,
                 eager: bool = False) -> None:
        # kafka-python's poll returns what it has fetched without waiting to fill a batch:
        # it is always eager.
        from kafka import KafkaConsumer

        config: dict[str, Any] = {
            "auto_offset_reset": "earliest",
            "max_poll_records": max_poll_records,
            "fetch_max_bytes": 32 * 1024 * 1024,
            "max_partition_fetch_bytes": 4 * 1024 * 1024,
            "fetch_max_wait_ms": 100,
            "receive_buffer_bytes": 1024 * 1024,
            # Pure-Python CRC32C is the single largest cost of kafka-python's fetch path; the
            # broker verified the CRC on produce and TCP checks every segment.
            "check_crcs": False,
        }
        config.update(_kafka_python_options(settings.options, "consumer"))
        self.group_id = group_id
        # kafka-python 3 runs rebalance callbacks on its IO thread, where a blocking call
        # (commit, end_offsets, ...) cannot run: a commit made there is sent asynchronously
        # and awaited by the (async) listener before the rebalance goes on.
        self._in_listener = False
        self._deferred: list[Any] = []
        self._c = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=group_id, enable_auto_commit=False, **config,
        )

    @staticmethod
    def _ktp(tp: TopicPartition) -> Any:
        from kafka import TopicPartition as KTP

        return KTP(tp.topic, tp.partition)

    def subscribe(self, topics: Sequence[str], *, on_assigned: RebalanceCallback | None = None,
                  on_revoked: RebalanceCallback | None = None) -> None:
        self._c.subscribe(topics=list(topics), listener=_kafka_python_listener(self, on_assigned, on_revoked))

    def _call_listener(self, callback: RebalanceCallback | None, partitions: Any) -> list[Any]:
        """Run a rebalance callback; returns the commit futures it left to await."""
        if callback is None or not partitions:
            return []
        self._deferred = []
        self._in_listener = True
        try:
            callback(sorted(TopicPartition(tp.topic, tp.partition) for tp in partitions))
        finally:
            self._in_listener = False
        deferred, self._deferred = self._deferred, []
        return deferred

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self._c.assign([self._ktp(tp) for tp in partitions])

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(TopicPartition(tp.topic, tp.partition) for tp in self._c.assignment())

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        from kafka.errors import KafkaError

        try:
            batches = self._c.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:  # a rebalance callback's error arrives here too (as the cause)
            raise KafkaTransportError(f"poll failed: {exc}") from exc
        out: list[Record] = []
        for records in batches.values():
            out.extend(Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in records)
        return out

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._c.seek(self._ktp(partition), offset)

    def position(self, partition: TopicPartition) -> int | None:
        self._not_in_listener("position")
        try:
            return self._c.position(self._ktp(partition), timeout_ms=_TIMEOUT_MS)
        except Exception as exc:  # kafka-python: IllegalStateError / timeouts
            log.debug("no position for %s[%d]: %s", partition.topic, partition.partition, exc)
            return None

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        self._not_in_listener("committed")
        try:
            return {tp: self._c.committed(self._ktp(tp), timeout_ms=_TIMEOUT_MS) for tp in partitions}
        except Exception as exc:  # KafkaTimeoutError and friends
            raise KafkaTransportError(f"could not read committed offsets: {exc}") from exc

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        from kafka.structs import OffsetAndMetadata

        if not offsets:
            return
        extra = ("", -1)[: len(OffsetAndMetadata._fields) - 1]  # 2.x: (offset, metadata); 3.x: + leader_epoch
        request = {self._ktp(tp): OffsetAndMetadata(off, *extra) for tp, off in offsets.items()}
        if self._in_listener and _KP_ASYNC_LISTENER is not None:
            self._deferred.append((self._c.commit_async(request), offsets))
            return
        try:
            self._c.commit(request, timeout_ms=_TIMEOUT_MS)
        except Exception as exc:  # CommitFailedError, KafkaTimeoutError, ...
            raise KafkaTransportError(f"commit of {_fmt_offsets(offsets)} failed: {exc}") from exc

    def _not_in_listener(self, what: str) -> None:
        if self._in_listener and _KP_ASYNC_LISTENER is not None:
            raise KafkaTransportError(
                f"{what} blocks, and kafka-python runs rebalance callbacks on its IO thread: call it "
                "after poll() returns (commit and seek are fine inside a callback)"
            )

    def end_offsets(self, partitions: Iterable[TopicPartition], *,
                    cached: bool = False) -> dict[TopicPartition, int]:
        if cached:  # the high watermark of the last fetch response: no round trip
            known = {tp: self._c.highwater(self._ktp(tp)) for tp in partitions}
            return {tp: off for tp, off in known.items() if off is not None}
        self._not_in_listener("end_offsets")
        try:
            ends = self._c.end_offsets([self._ktp(tp) for tp in partitions], timeout_ms=_TIMEOUT_MS)
        except Exception as exc:  # KafkaTimeoutError and friends
            raise KafkaTransportError(f"could not read end offsets: {exc}") from exc
        return {TopicPartition(tp.topic, tp.partition): off for tp, off in ends.items()}

    def partitions_for(self, topic: str) -> list[int]:
        return _retry_partitions(topic, lambda: self._c.partitions_for_topic(topic))

    def close(self) -> None:
        self._c.close(autocommit=False, timeout_ms=_TIMEOUT_MS)


# --------------------------------------------------------------------------- confluent-kafka


def _raise_for(err: Any, what: str) -> None:
    if err is not None:
        raise KafkaTransportError(f"{what}: {err}")


class _CKProducer:
    def __init__(self, settings: KafkaSettings, linger_ms: float = 5.0) -> None:
        ck = _confluent_module()
        config: dict[str, Any] = {"bootstrap.servers": settings.bootstrap_servers, "acks": "all",
                                  "linger.ms": linger_ms, "enable.idempotence": False}
        config.update(_confluent_options(settings.options))
        try:
            self._p = ck.Producer(config)
        except ck.KafkaException as exc:
            raise ConfigError(f"confluent-kafka rejected the producer configuration: {exc}") from None
        self._errors: list[Any] = []

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(err)

    def send(self, topic: str, value: bytes, key: bytes | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None) -> None:
        while True:
            try:
                self._p.produce(topic, value, key, on_delivery=self._delivered,
                                headers=list(headers) if headers else None)
                break
            except BufferError:  # local queue full: serve delivery reports and retry
                self._p.poll(0.05)
        self._p.poll(0)

    def flush(self, timeout: float | None = None) -> None:
        left = self._p.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTransportError(f"{left} record(s) still undelivered after {timeout} s")
        if self._errors:
            first, n = self._errors[0], len(self._errors)
            self._errors.clear()
            raise KafkaTransportError(f"{n} record(s) were not delivered; first error: {first}")

    def close(self) -> None:
        left = self._p.flush(10)
        if left:
            log.warning("closing a producer with %d undelivered record(s)", left)
        close = getattr(self._p, "close", None)  # recent confluent-kafka; older ones close on GC
        if close is not None:
            close()


class _CKConsumer:
    def __init__(self, settings: KafkaSettings, group_id: str | None, max_poll_records: int, *,
                 eager: bool = False) -> None:
        self.eager = eager
        ck = self._ck = _confluent_module()
        config: dict[str, Any] = {
            "bootstrap.servers": settings.bootstrap_servers,
            # librdkafka needs a group id even for assign(); it is never used to commit then.
            "group.id": group_id or f"towerstream-unused-{os.getpid()}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 100,
            # librdkafka's default (100,000) let a fast learner drain its prefetch queue and wait
            # on fetches half the time: the LR runtime through the broker learned 71k events/s
            # at 150k per CPU-s; with 1,000,000 it learns 170-176k/s (bench_kafka). Memory stays
            # bounded by queued.max.messages.kbytes (64 MB).
            "queued.min.messages": 1_000_000,
        }
        config.update(_confluent_options(settings.options))
        self.group_id = group_id
        # where assign() in a group starts a partition without a commit (as librdkafka would)
        self._reset_offset = (ck.OFFSET_END if str(config.get("auto.offset.reset")) in ("latest", "largest", "end")
                              else ck.OFFSET_BEGINNING)
        self._incremental = ("cooperative" in str(config.get("partition.assignment.strategy", ""))
                             or config.get("group.protocol") == "consumer")
        try:
            self._c = ck.Consumer(config)
        except ck.KafkaException as exc:
            raise ConfigError(f"confluent-kafka rejected the consumer configuration: {exc}") from None
        self._in_assign: dict[TopicPartition, int] | None = None

    def _ctp(self, tp: TopicPartition, offset: int | None = None) -> Any:
        if offset is None:
            return self._ck.TopicPartition(tp.topic, tp.partition)
        return self._ck.TopicPartition(tp.topic, tp.partition, offset)

    def subscribe(self, topics: Sequence[str], *, on_assigned: RebalanceCallback | None = None,
                  on_revoked: RebalanceCallback | None = None) -> None:
        invalid = self._ck.OFFSET_INVALID

        def assigned(consumer: Any, partitions: list[Any]) -> None:
            tps = sorted(TopicPartition(p.topic, p.partition) for p in partitions)
            self._in_assign = {}
            try:
                if on_assigned is not None and tps:
                    on_assigned(tps)
                seeks = self._in_assign
            finally:
                self._in_assign = None
            # A start offset is set by passing it to assign(), not by seek() (librdkafka).
            start = [self._ctp(tp, seeks.get(tp, invalid)) for tp in tps]
            if self._incremental:
                consumer.incremental_assign(start)
            else:
                consumer.assign(start)

        def revoked(consumer: Any, partitions: list[Any]) -> None:
            # confluent-kafka unassigns by itself after this callback (eager or cooperative)
            tps = sorted(TopicPartition(p.topic, p.partition) for p in partitions)
            if on_revoked is not None and tps:
                on_revoked(tps)

        self._c.subscribe(list(topics), on_assign=assigned, on_revoke=revoked)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        if self.group_id is None:
            # No group: nothing is committed, so start at the beginning explicitly. Left to
            # librdkafka, it first asks the (placeholder) group's coordinator for committed
            # offsets, and on a fresh cluster that answers NOT_COORDINATOR once and the
            # partitions never start fetching.
            begin = self._ck.OFFSET_BEGINNING
            self._c.assign([self._ctp(tp, begin) for tp in partitions])
        else:
            # A group: start where it committed, asked explicitly (with retries) rather than
            # left to librdkafka, for the same reason: a fresh group on a fresh cluster gets
            # NOT_COORDINATOR once and its partitions never start fetching (a distributed rank
            # waited forever). No committed offset: auto.offset.reset, as librdkafka would.
            tps = list(partitions)
            start = self.committed(tps)
            self._c.assign([self._ctp(tp, self._reset_offset if start[tp] is None else start[tp]) for tp in tps])

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(TopicPartition(p.topic, p.partition) for p in self._c.assignment())

    def _consume(self, max_records: int, timeout_s: float) -> list[Any]:
        c = self._c
        if not self.eager:  # librdkafka waits up to timeout_s to fill max_records
            return c.consume(num_messages=max_records, timeout=timeout_s)
        # Eager: what is fetched already, else block for the first record only, then take
        # whatever else has arrived, so a latency-sensitive loop never waits to fill a batch.
        messages = c.consume(num_messages=max_records, timeout=0)
        if not messages:
            messages = c.consume(num_messages=1, timeout=timeout_s)
            if messages and max_records > 1:
                messages.extend(c.consume(num_messages=max_records - 1, timeout=0))
        return messages

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        try:
            messages = self._consume(max_records, timeout_s)
        except self._ck.KafkaException as exc:
            raise KafkaTransportError(f"poll failed: {exc}") from exc
        out: list[Record] = []
        append = out.append
        for m in messages:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaTransportError(f"consumer failed: {err}")
                log.warning("consumer error on %s[%s]: %s", m.topic(), m.partition(), err)
                continue
            append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]))
        return out

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if self._in_assign is not None:
            self._in_assign[partition] = offset
            return
        ck = self._ck
        try:
            self._c.seek(self._ctp(partition, offset))
        except ck.KafkaException:
            # Not fetching yet: restart the partition at the offset instead.
            self._c.incremental_unassign([self._ctp(partition)])
            self._c.incremental_assign([self._ctp(partition, offset)])

    def position(self, partition: TopicPartition) -> int | None:
        (tp,) = self._c.position([self._ctp(partition)])
        return tp.offset if tp.offset >= 0 else None

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        # retried for 30 s: a fresh group on a fresh cluster answers NOT_COORDINATOR at first
        ctps = [self._ctp(tp) for tp in partitions]
        timeout_s = 30.0
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result = self._c.committed(ctps, timeout=10)
                why: Any = next((p.error for p in result if p.error is not None), None)
                if why is None:
                    return {TopicPartition(p.topic, p.partition): (p.offset if p.offset >= 0 else None)
                            for p in result}
            except self._ck.KafkaException as exc:
                why = exc
            if time.monotonic() >= deadline:
                raise KafkaTransportError(f"could not read group {self.group_id!r}'s committed offsets within "
                                          f"{timeout_s:g} s: {why}")
            log.debug("committed offsets of %r not ready (%s); retrying", self.group_id, why)
            time.sleep(0.2)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            result = self._c.commit(offsets=[self._ctp(tp, off) for tp, off in offsets.items()],
                                    asynchronous=False)
        except self._ck.KafkaException as exc:
            raise KafkaTransportError(f"commit of {_fmt_offsets(offsets)} failed: {exc}") from exc
        for p in result or ():
            _raise_for(p.error, f"commit of {p.topic}[{p.partition}]@{p.offset} failed")

    def end_offsets(self, partitions: Iterable[TopicPartition], *,
                    cached: bool = False) -> dict[TopicPartition, int]:
        out = {}
        for tp in partitions:
            # cached: the high watermark librdkafka learnt from its last fetch (no round trip)
            _low, high = self._c.get_watermark_offsets(self._ctp(tp), timeout=10, cached=cached)
            if high >= 0:
                out[tp] = high
        return out

    def partitions_for(self, topic: str) -> list[int]:
        def lookup() -> Any:
            meta = self._c.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                return None
            return set(meta.partitions)

        return _retry_partitions(topic, lookup)

    def close(self) -> None:
        self._c.close()


# --------------------------------------------------------------------------- factories and admin


def _retry_partitions(topic: str, lookup: Callable[[], Any], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        parts = lookup()
        if parts:
            return sorted(parts)
        if time.monotonic() >= deadline:
            raise KafkaTransportError(f"topic {topic!r} has no partitions after {timeout_s} s: does it exist?")
        time.sleep(0.1)


def _fmt_offsets(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in sorted(offsets.items()))


def make_producer(settings: KafkaSettings, *, linger_ms: float = 5.0) -> Producer:
    """A producer for ``settings.client`` (acks=all, a short linger for batching).

    ``linger_ms=0`` sends each record as soon as possible: for latency-bound records
    (requests a scorer answers), where a 5 ms batching wait would be 5 ms of every answer.
    ``TOWERSTREAM_KAFKA_OPTIONS`` still wins over it.
    """
    if linger_ms < 0:
        raise ConfigError(f"linger_ms must be >= 0, got {linger_ms}")
    if settings.client == "confluent":
        return _CKProducer(settings, linger_ms)
    return _KPProducer(settings, linger_ms)


def make_consumer(
    settings: KafkaSettings,
    group_id: str | None,
    topics: Sequence[str] = (),
    *,
    on_assigned: RebalanceCallback | None = None,
    on_revoked: RebalanceCallback | None = None,
    max_poll_records: int = 2000,
    eager: bool = False,
) -> Consumer:
    """A consumer with auto-commit off, starting at the earliest offset when the group has
    none committed. With ``topics`` it subscribes (group membership); without, call
    :meth:`Consumer.assign` yourself.

    ``eager``: ``poll`` returns as soon as a record is there (a request loop: latency)
    rather than waiting up to its timeout to fill ``max_records`` (a learner: big batches).
    Only confluent-kafka waits to fill; kafka-python is eager either way."""
    cls = _CKConsumer if settings.client == "confluent" else _KPConsumer
    consumer = cls(settings, group_id, max_poll_records, eager=eager)
    if topics:
        consumer.subscribe(topics, on_assigned=on_assigned, on_revoked=on_revoked)
    return consumer


def ensure_topics(settings: KafkaSettings, topics: Mapping[str, int], *, replication_factor: int = 1,
                  timeout_s: float = 30.0) -> None:
    """Create the topics that do not exist yet (``{name: partitions}``) and wait until
    the new ones show all their partitions. Existing topics are left as they are (a
    warning is logged when one has fewer partitions than asked for)."""
    if not topics:
        return
    created: set[str] = set()
    if settings.client == "confluent":
        ck = _confluent_module()
        from confluent_kafka.admin import AdminClient, NewTopic

        config = {"bootstrap.servers": settings.bootstrap_servers, **_confluent_options(settings.options)}
        admin = AdminClient(config)
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=n, replication_factor=replication_factor) for t, n in topics.items()],
            operation_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
                created.add(name)
            except ck.KafkaException as exc:
                if exc.args[0].code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaTransportError(f"could not create topic {name!r}: {exc}") from exc
    else:
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers.split(","),
                                 **_kafka_python_options(settings.options, "admin"))
        try:
            for name, n in topics.items():
                try:
                    admin.create_topics([NewTopic(name, n, replication_factor)], timeout_ms=int(timeout_s * 1000))
                    created.add(name)
                except TopicAlreadyExistsError:
                    pass
                except Exception as exc:
                    raise KafkaTransportError(f"could not create topic {name!r}: {exc}") from exc
        finally:
            admin.close()
    # Wait until the metadata shows every partition (topic creation is asynchronous).
    consumer = make_consumer(settings, None)
    try:
        deadline = time.monotonic() + timeout_s
        for name, n in topics.items():
            if name not in created:
                have = len(consumer.partitions_for(name))
                if have < n:
                    log.warning("topic %r exists with %d partitions (asked for %d): left as it is", name, have, n)
                continue
            while len(consumer.partitions_for(name)) < n:
                if time.monotonic() >= deadline:
                    raise KafkaTransportError(f"topic {name!r} does not show {n} partitions after {timeout_s} s")
                time.sleep(0.1)
    finally:
        consumer.close()


def end_offsets(settings: KafkaSettings, topics: Iterable[str]) -> dict[TopicPartition, int]:
    """The end offset (offset of the next record to be written) of every partition."""
    consumer = make_consumer(settings, None)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for(t)]
        return consumer.end_offsets(tps)
    finally:
        consumer.close()
