"""A real single-node Apache Kafka broker (KRaft), started by towerstream itself.

No Docker: the broker jars are resolved once from Maven Central with
``deploy/kafka/pom.xml`` (:func:`ensure_jars`), and :class:`LocalBroker` runs
``kafka.Kafka`` in its own process group with a rendered copy of
``deploy/kafka/server.properties``. A pid file in the data directory lets another
process (``towerstream broker status|stop``) find the broker.

Layout of a data directory::

    <data_dir>/server.properties   rendered config
    <data_dir>/broker.json         pid file: pid, ports, bootstrap address
    <data_dir>/state.json          cluster id and the ports last used
    <data_dir>/kraft/              log.dirs (formatted once)
    <data_dir>/logs/               server.log (log4j2) and broker.out (stdout/stderr)

>>> cfg = BrokerConfig(port=19092, controller_port=19093, data_dir=Path("/tmp/b"))
>>> cfg.bootstrap
'127.0.0.1:19092'
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Literal, Mapping

from streams.errors import ConfigError, StreamsError

__all__ = [
    "bootstrap_or_local",
    "preexec_die_with_parent",
    "BrokerConfig",
    "BrokerError",
    "BrokerAlreadyRunningError",
    "BrokerStatus",
    "LocalBroker",
    "DEFAULT_KAFKA_VERSION",
    "ensure_jars",
    "find_free_port",
    "find_java",
    "read_status",
    "stop_broker",
]

logger = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.3.1"
_CACHE_ROOT = Path("~/.cache/towerstream")
_DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "kafka"
_MARKER = ".towerstream-jars.json"
_PID_FILE = "broker.json"
_STATE_FILE = "state.json"
_MAIN_CLASS = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"


class BrokerError(StreamsError):
    """The local Kafka broker could not be prepared, started, reached or stopped."""


class BrokerAlreadyRunningError(BrokerError):
    """A broker started by another process already runs on this data directory."""

    def __init__(self, message: str, status: "BrokerStatus") -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to run the local broker.

    Parameters
    ----------
    port
        PLAINTEXT client port; ``0`` picks a free one at start (or reuses the last one).
    controller_port
        KRaft controller port; ``0`` picks a free one at start.
    data_dir
        Holds the config, the pid file, the Kafka log dir and the broker logs.
    host
        Interface the broker binds to and advertises.
    kafka_version
        One version for every Kafka artifact resolved by Maven.
    heap
        JVM heap options, split on spaces.
    jar_dir
        Where the broker classpath is copied; ``None`` means
        ``~/.cache/towerstream/kafka-<version>/libs``.
    deploy_dir
        Folder with ``pom.xml``, ``server.properties`` and ``log4j2.yaml``.
    start_timeout_s, stop_timeout_s
        Deadlines for readiness and for a clean shutdown before SIGKILL.
    java_opts
        Extra JVM options.
    """

    port: int = 9092
    controller_port: int = 9093
    data_dir: Path = field(default_factory=lambda: (_CACHE_ROOT / "broker").expanduser())
    host: str = "127.0.0.1"
    kafka_version: str = DEFAULT_KAFKA_VERSION
    heap: str = "-Xms128m -Xmx512m"
    jar_dir: Path | None = None
    deploy_dir: Path = _DEPLOY_DIR
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    java_opts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The broker runs with its own working directory: a relative data dir would point
        # elsewhere for it, so every path is made absolute here, once.
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def libs_dir(self) -> Path:
        """Folder of the broker jars."""
        if self.jar_dir is not None:
            return Path(self.jar_dir).expanduser()
        return (_CACHE_ROOT / f"kafka-{self.kafka_version}" / "libs").expanduser()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "BrokerConfig":
        """Build a config from ``TOWERSTREAM_BROKER_*`` / ``TOWERSTREAM_KAFKA_*`` variables.

        Variables: ``TOWERSTREAM_BROKER_PORT``, ``TOWERSTREAM_BROKER_CONTROLLER_PORT``,
        ``TOWERSTREAM_BROKER_DATA_DIR``, ``TOWERSTREAM_BROKER_HOST``,
        ``TOWERSTREAM_BROKER_HEAP``, ``TOWERSTREAM_KAFKA_VERSION``,
        ``TOWERSTREAM_KAFKA_LIBS``, ``TOWERSTREAM_KAFKA_DEPLOY_DIR``. Keyword
        ``overrides`` that are not ``None`` win over the environment.

        >>> BrokerConfig.from_env({"TOWERSTREAM_BROKER_PORT": "29092"}).port
        29092
        """
        env = os.environ if env is None else env
        names = {
            "port": ("TOWERSTREAM_BROKER_PORT", int),
            "controller_port": ("TOWERSTREAM_BROKER_CONTROLLER_PORT", int),
            "data_dir": ("TOWERSTREAM_BROKER_DATA_DIR", lambda v: Path(v).expanduser()),
            "host": ("TOWERSTREAM_BROKER_HOST", str),
            "heap": ("TOWERSTREAM_BROKER_HEAP", str),
            "kafka_version": ("TOWERSTREAM_KAFKA_VERSION", str),
            "jar_dir": ("TOWERSTREAM_KAFKA_LIBS", lambda v: Path(v).expanduser()),
            "deploy_dir": ("TOWERSTREAM_KAFKA_DEPLOY_DIR", lambda v: Path(v).expanduser()),
        }
        kwargs: dict[str, object] = {}
        for attr, (var, conv) in names.items():
            if env.get(var):
                try:
                    kwargs[attr] = conv(env[var])
                except ValueError as exc:
                    raise ConfigError(f"{var}={env[var]!r} is invalid: {exc}") from exc
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BrokerStatus:
    """What the pid file and the process table say about a data directory."""

    state: Literal["running", "stopped", "stale"]
    pid: int | None = None
    bootstrap: str | None = None
    data_dir: Path | None = None

    @property
    def running(self) -> bool:
        """True when a broker process of this data directory is alive."""
        return self.state == "running"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def find_java() -> str:
    """Path of the ``java`` executable (``$JAVA_HOME/bin/java`` first); BrokerError if none."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise BrokerError("java not found: install a JDK 17+ (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME")
    return java


# --------------------------------------------------------------------------- jars


def _jar_names(libs: Path) -> list[str]:
    return sorted(p.name for p in libs.glob("*.jar"))


def _jars_ready(config: BrokerConfig) -> bool:
    marker = config.libs_dir / _MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("kafka_version") == config.kafka_version and all(
        (config.libs_dir / name).is_file() for name in info.get("jars", ())
    )


def ensure_jars(config: BrokerConfig) -> Path:
    """Make sure the broker classpath is in ``config.libs_dir``; return that folder.

    The first call runs Maven (``dependency:copy-dependencies``) into a temporary
    folder and moves it into place with a marker file; later calls only read the
    marker, so they are instant and work offline. A file lock serialises concurrent
    callers (pytest-xdist workers, two CLIs).
    """
    if _jars_ready(config):
        return config.libs_dir
    libs = config.libs_dir
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".jars.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _jars_ready(config):
            return libs
        pom = Path(config.deploy_dir) / "pom.xml"
        if not pom.is_file():
            raise BrokerError(f"{pom} not found: set TOWERSTREAM_KAFKA_DEPLOY_DIR to the repository's deploy/kafka folder")
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("mvn not found: install Maven 3.6+ (e.g. apt-get install maven), or put the "
                              f"Kafka {config.kafka_version} jars in {libs} yourself")
        tmp = libs.parent / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom), "dependency:copy-dependencies",
               f"-Dkafka.version={config.kafka_version}", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
        logger.info("resolving Kafka %s jars with Maven into %s", config.kafka_version, libs)
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not list(tmp.glob("kafka_2.13-*.jar")):
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stdout + proc.stderr).strip()[-3000:]
            raise BrokerError(f"Maven could not resolve Kafka {config.kafka_version} (exit {proc.returncode}); "
                              f"check network access to Maven Central. Command: {' '.join(cmd)}\n{tail}")
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        marker = {"kafka_version": config.kafka_version, "jars": _jar_names(libs)}
        (libs / _MARKER).write_text(json.dumps(marker, indent=1))
        logger.info("resolved %d jars in %.1fs", len(marker["jars"]), time.monotonic() - started)
        return libs


# --------------------------------------------------------------------------- pid file


def _is_broker_pid(pid: int) -> bool:
    """True when ``pid`` is alive and (where /proc exists) runs ``kafka.Kafka``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            raw = cmdline.read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
        return not zombie and _MAIN_CLASS.encode() in raw.split(b"\0")
    return True


def read_status(data_dir: Path) -> BrokerStatus:
    """Status of the broker of ``data_dir`` from its pid file (any process may ask)."""
    data_dir = Path(data_dir).expanduser()
    try:
        info = json.loads((data_dir / _PID_FILE).read_text())
    except (OSError, ValueError):
        return BrokerStatus("stopped", data_dir=data_dir)
    pid = int(info["pid"])
    state: Literal["running", "stale"] = "running" if _is_broker_pid(pid) else "stale"
    return BrokerStatus(state, pid=pid, bootstrap=info.get("bootstrap"), data_dir=data_dir)


def _wait_gone(pid: int, timeout_s: float, proc: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return True
        if proc is None and not _is_broker_pid(pid):
            return True
        time.sleep(0.1)
    return False


def _terminate(pid: int, timeout_s: float, proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group ``pid``; SIGKILL it after ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout_s, proc):
        logger.warning("broker pid %d ignored SIGTERM for %.0fs; sending SIGKILL", pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10.0, proc):
            raise BrokerError(f"broker pid {pid} did not exit after SIGKILL")


def stop_broker(data_dir: Path, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Stop the broker of ``data_dir``: SIGTERM its process group, SIGKILL after ``timeout_s``.

    Works from any process (it reads the pid file). Returns True when a running
    broker was stopped, False when none was running.
    """
    status = read_status(data_dir)
    pid_file = Path(data_dir).expanduser() / _PID_FILE
    if not status.running or status.pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    logger.info("stopping Kafka broker pid %d (%s)", status.pid, status.bootstrap)
    _terminate(status.pid, timeout_s, proc if proc is not None and proc.pid == status.pid else None)
    pid_file.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------- broker


def _cluster_id() -> str:
    """A Kafka-style cluster id: 16 random bytes, url-safe base64, no padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_PR_SET_PDEATHSIG = 1


def preexec_die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the child when its parent dies (Linux).

    For launchers that must leave nothing behind even when they are SIGKILLed (the demo):
    the child's graceful shutdown still runs, since it gets SIGTERM, not SIGKILL. ``None``
    where ``prctl`` is not available (the caller then relies on its own cleanup). The
    signal follows the *thread* that started the child: start such children from a
    thread that lives as long as the launcher (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


class LocalBroker:
    """A single-node KRaft Kafka broker in a child process group.

    Use as a context manager (stops on exit) or call :meth:`start` / :meth:`stop`.
    ``start`` formats the log dir once, starts ``kafka.Kafka`` and returns when the
    broker answers a metadata request; it replaces ``self.config`` by a copy whose
    ports of 0 are resolved, so :attr:`bootstrap` is the real address.
    """

    def __init__(self, config: BrokerConfig | None = None, *, die_with_parent: bool = False) -> None:
        self.config = config if config is not None else BrokerConfig.from_env()
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    # paths
    @property
    def data_dir(self) -> Path:
        """The resolved data directory."""
        return Path(self.config.data_dir).expanduser()

    @property
    def log_file(self) -> Path:
        """The broker's stdout/stderr (console log at WARN, JVM errors)."""
        return self.data_dir / "logs" / "broker.out"

    @property
    def bootstrap(self) -> str:
        """``host:port`` once started (ports of 0 are resolved by :meth:`start`)."""
        return self.config.bootstrap

    def __repr__(self) -> str:
        return f"LocalBroker(bootstrap={self.bootstrap!r}, data_dir={str(self.data_dir)!r})"

    def status(self) -> BrokerStatus:
        """Running, stopped, or stale (a pid file whose process is gone)."""
        return read_status(self.data_dir)

    def start(self) -> str:
        """Start the broker and wait until it answers; return the bootstrap address.

        Calling it again on a broker this object started is a no-op. Raises
        :class:`BrokerAlreadyRunningError` when another process's broker runs on
        the same data directory, and :class:`BrokerError` when the broker exits or
        does not answer before ``start_timeout_s`` (with the tail of its log).
        """
        if self._proc is not None and self._proc.poll() is None:
            return self.bootstrap
        current = self.status()
        if current.running:
            raise BrokerAlreadyRunningError(
                f"a Kafka broker (pid {current.pid}) already serves {current.bootstrap} from {self.data_dir}; "
                "use it, or run `towerstream broker stop` first", current)
        java = find_java()
        libs = ensure_jars(self.config)
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.config = self._resolve_ports()
        props = self._render_properties()
        self._format_storage(java, libs, props)
        cmd = [java, *self.config.heap.split(), "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-Djava.awt.headless=true", f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
               f"-Dlog4j2.configurationFile={Path(self.config.deploy_dir) / 'log4j2.yaml'}",
               *self.config.java_opts, "-cp", f"{libs}/*", _MAIN_CLASS, str(props)]
        logger.info("starting Kafka %s on %s (data %s)", self.config.kafka_version, self.bootstrap, self.data_dir)
        with open(self.log_file, "ab") as out:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=self.data_dir,
                                          preexec_fn=preexec_die_with_parent() if self.die_with_parent else None)
        info = {"pid": self._proc.pid, "bootstrap": self.bootstrap, "port": self.config.port,
                "controller_port": self.config.controller_port, "started_at": time.time()}
        (self.data_dir / _PID_FILE).write_text(json.dumps(info))
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.bootstrap

    def stop(self) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL); True if one was running."""
        stopped = stop_broker(self.data_dir, self.config.stop_timeout_s, self._proc)
        if self._proc is not None:
            if self._proc.poll() is None:  # our child, but its pid file is gone or rewritten
                _terminate(self._proc.pid, self.config.stop_timeout_s, self._proc)
                stopped = True
            self._proc = None
        return stopped

    def wait(self) -> int:
        """Block until the broker process exits (for ``--foreground``); its exit code."""
        if self._proc is None:
            raise BrokerError("this LocalBroker did not start a broker")
        return self._proc.wait()

    def __enter__(self) -> "LocalBroker":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # internals
    def _state(self) -> dict[str, object]:
        try:
            return dict(json.loads((self.data_dir / _STATE_FILE).read_text()))
        except (OSError, ValueError):
            return {}

    def _resolve_ports(self) -> BrokerConfig:
        """Replace ports of 0: reuse the ports of the last run when free, else pick free ones."""
        cfg, state, host = self.config, self._state(), self.config.host
        chosen: dict[str, int] = {}
        for name in ("port", "controller_port"):
            port = int(getattr(cfg, name))
            if port == 0:
                last = int(state.get(name, 0) or 0)  # type: ignore[call-overload]
                port = last if last and last not in chosen.values() and _port_free(host, last) else 0
                while port == 0 or port in chosen.values():
                    port = find_free_port(host)
            elif not _port_free(host, port):
                raise BrokerError(f"port {port} on {host} is in use: stop what listens there or pick "
                                  "another port (--port / TOWERSTREAM_BROKER_PORT, 0 = any free port)")
            chosen[name] = port
        return replace(cfg, **chosen)

    def _render_properties(self) -> Path:
        template = (Path(self.config.deploy_dir) / "server.properties").read_text()
        text = string.Template(template).substitute(
            host=self.config.host, port=self.config.port, controller_port=self.config.controller_port,
            log_dir=self.data_dir / "kraft")
        path = self.data_dir / "server.properties"
        path.write_text(text)
        return path

    def _format_storage(self, java: str, libs: Path, props: Path) -> None:
        """Run the KRaft storage tool once; a log dir with meta.properties is left alone."""
        state = self._state()
        meta = self.data_dir / "kraft" / "meta.properties"
        if meta.is_file():
            ids = [line.split("=", 1)[1].strip() for line in meta.read_text().splitlines() if line.startswith("cluster.id=")]
            cluster_id = ids[0] if ids else str(state.get("cluster_id", ""))
        else:
            cluster_id = _cluster_id()
            cmd = [java, "-Xmx256m", f"-Dlog4j2.configurationFile={Path(self.config.deploy_dir) / 'log4j2.yaml'}",
                   f"-Dkafka.logs.dir={self.data_dir / 'logs'}", "-cp", f"{libs}/*", _STORAGE_TOOL,
                   "format", "-t", cluster_id, "-c", str(props)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BrokerError(f"formatting {self.data_dir / 'kraft'} failed (exit {proc.returncode}): "
                                  f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
            logger.info("formatted %s with cluster id %s", self.data_dir / "kraft", cluster_id)
        state = {"cluster_id": cluster_id, "port": self.config.port, "controller_port": self.config.controller_port}
        (self.data_dir / _STATE_FILE).write_text(json.dumps(state))

    def _wait_ready(self) -> None:
        """Poll a metadata request until the broker lists itself; fail fast if it exits."""
        try:
            from kafka import KafkaAdminClient
            from kafka.errors import KafkaConfigurationError, KafkaError
        except ImportError as exc:
            raise BrokerError("kafka-python is needed to probe the broker: pip install kafka-python") from exc

        deadline = time.monotonic() + self.config.start_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            code = self._proc.poll() if self._proc is not None else -1
            if code is not None:
                raise BrokerError(f"Kafka broker exited with code {code} during start (details in "
                                  f"{self.data_dir / 'logs' / 'server.log'}); last lines of {self.log_file}:\n"
                                  f"{_tail(self.log_file)}")
            if not _accepts(self.config.host, self.config.port):  # not listening yet: no client needed
                time.sleep(0.2)
                continue
            try:
                with _admin(KafkaAdminClient, self.bootstrap) as admin:
                    cluster = admin.describe_cluster()
                    if cluster.get("brokers") and cluster.get("controller_id", -1) != -1:
                        logger.info("Kafka broker ready on %s", self.bootstrap)
                        return
                    last_error = f"cluster not ready: {cluster}"
            except KafkaConfigurationError as exc:
                raise BrokerError(f"kafka-python rejected the readiness probe's settings: {exc}") from exc
            except (KafkaError, OSError) as exc:
                last_error = repr(exc)
            time.sleep(0.25)
        raise BrokerError(f"Kafka broker on {self.bootstrap} did not answer within {self.config.start_timeout_s:.0f}s "
                          f"({last_error}); last lines of {self.log_file}:\n{_tail(self.log_file)}")


def _accepts(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def bootstrap_or_local(bootstrap: str | None, prefix: str = "towerstream-broker-") -> Iterator[str]:
    """Yield ``bootstrap`` when one is given; otherwise start a throwaway :class:`LocalBroker`
    (free ports, a fresh temporary data directory named ``prefix...``), yield its
    bootstrap address and stop it afterwards (benchmarks run on either)."""
    if bootstrap:
        yield bootstrap
        return
    import tempfile

    config = BrokerConfig.from_env(port=0, controller_port=0, data_dir=Path(tempfile.mkdtemp(prefix=prefix)))
    with LocalBroker(config) as broker:
        yield broker.bootstrap


@contextlib.contextmanager
def _admin(factory: Any, bootstrap: str) -> Iterator[Any]:
    """A short-lived admin client whose connection attempts give up after a few seconds."""
    options: dict[str, object] = {"bootstrap_servers": bootstrap, "client_id": "towerstream-broker-probe",
                                  "request_timeout_ms": 3000}
    defaults = getattr(factory, "DEFAULT_CONFIG", {})
    for key in ("bootstrap_timeout_ms", "api_version_auto_timeout_ms"):  # kafka-python 3.x / 2.x
        if key in defaults:
            options[key] = 3000
    admin = factory(**options)
    try:
        yield admin
    finally:
        admin.close()
