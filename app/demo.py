"""``towerstream demo``: the whole pipeline, live, on one machine.

:class:`Demo` starts a local Kafka broker (or uses an existing cluster), creates the
topics, and runs every towerstream process as a child of its own:

* the producer: the click simulator (drift and new items on, ground truth written to
  ``truth.jsonl``) or a MovieLens replay, paced at ``rate`` events/s for ``duration_s``;
* one ``towerstream learn`` per learner (ctr, lr, two-tower, inttower), each in its own
  consumer group, checkpointing every 2 s;
* ``towerstream index run`` on the IntTower checkpoint, building every 10 s (started
  once that checkpoint exists);
* ``towerstream serve`` answering the simulated requests (started with the learners; it
  holds requests until a checkpoint and an index version exist), and applying the
  producer's item events (new items) to the served index between rebuilds
  (``--no-item-deltas``: new items wait for a rebuild).

The producer starts once every learner and the scorer answer on their metrics port, so
the stream does not pile up behind slow start-ups (torch imports).

Children use confluent-kafka when it is installed (``TOWERSTREAM_KAFKA_CLIENT`` wins):
kafka-python costs several times its CPU per record, which a 2-core machine running
eight processes cannot spare.

Every child exports Prometheus metrics on its own port. Every ``refresh_s`` the demo
scrapes them all, appends the scrape to ``timeseries.jsonl`` and redraws a table on
stderr. When the producer is done (or on Ctrl-C / SIGTERM) it lets the learners catch
up briefly, scrapes a last time, stops the children in dependency order (producer,
scorer, indexer, learners: SIGTERM, wait, SIGKILL), stops the broker and writes the
report (:mod:`app.report`). Nothing is left running: the children live in their own
process groups, die with the demo if it is killed (``PR_SET_PDEATHSIG``), and every pid
and port is written to ``pids.json``.

Run directory::

    RUN/demo.json          configuration, children, ports, timings, outcome
    RUN/pids.json          pids and ports of the demo and every child
    RUN/timeseries.jsonl   one line per scrape: every towerstream_* sample per process
    RUN/truth.jsonl        simulator ground truth: drift points, new items' first impressions
                           (a replay: each item's first rating, every item being new once)
    RUN/index_versions.jsonl, RUN/index_items.json   index versions seen, and the first
                           version holding each item
    RUN/ckpt/ RUN/index/ RUN/broker/ RUN/logs/   checkpoints, index store, broker data, child logs
    RUN/report.md + *.png  the report
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from streams.broker import preexec_die_with_parent
from streams.errors import ConfigError

from app.samples import (LEARNERS, consumer_lag, freshness_buckets, histogram_quantile, latency_buckets, machine_info,
                         parse_metrics, sample_key)

__all__ = ["DemoConfig", "Demo", "DEFAULT_RATE", "DEFAULT_DURATION_S"]

logger = logging.getLogger(__name__)

DEFAULT_RATE = 1500.0
DEFAULT_DURATION_S = 150.0


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (see ``towerstream demo --help``).

    Parameters
    ----------
    out
        Run directory (created).
    duration_s, rate
        The producer runs ``duration_s`` seconds at ``rate`` events/s.
    seed
        Simulator seed.
    replay
        A MovieLens folder to replay instead of the simulator (bad lines skipped).
    bootstrap_servers
        An existing Kafka cluster; None launches a local broker under ``out/broker``.
    report
        Write ``report.md`` and the plots at the end.
    learners, index_learner
        Learners to run, and the one whose checkpoint is indexed and served.
    index_period_s, checkpoint_every_s, refresh_s
        Index build period, learner checkpoint period, scrape/table period.
    drain_s
        After the producer ends, wait at most this long for the learners to catch up.
    drift_every, new_item_rate
        Simulator dynamics; None: about 3 drifts and 200 new items over the run.
    batch_nice
        Niceness of the batch work (learners, indexer) relative to the request path: the
        producer (it stands in for the front end that sends the requests, and a request's
        latency runs from its send), the broker and the scorer. On a shared machine the
        kernel then gives the request path the CPU first, as a cgroup CPU weight would in
        production (0: all equal).
    item_deltas
        The producer announces new items on ``<prefix>.items`` and the scorer applies them
        to the served index between rebuilds (False: new items wait for a rebuild).
    """

    out: Path
    duration_s: float = DEFAULT_DURATION_S
    rate: float = DEFAULT_RATE
    seed: int = 7
    replay: Path | None = None
    bootstrap_servers: str | None = None
    report: bool = True
    learners: tuple[str, ...] = LEARNERS
    index_learner: str = "inttower"
    index_period_s: float = 10.0
    checkpoint_every_s: float = 2.0
    refresh_s: float = 2.0
    drain_s: float = 15.0
    drift_every: int | None = None
    new_item_rate: float | None = None
    batch_nice: int = 10
    item_deltas: bool = True

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ConfigError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if self.rate <= 0:
            raise ConfigError(f"--rate must be > 0 events/s, got {self.rate}")
        if not 0 <= self.batch_nice <= 19:
            raise ConfigError(f"--batch-nice must be in 0..19 (Linux niceness), got {self.batch_nice}")
        if self.index_learner not in self.learners:
            raise ConfigError(f"the indexed learner {self.index_learner!r} must be one of {self.learners}")
        if self.replay is not None and not Path(self.replay).is_dir():
            raise ConfigError(f"--replay {self.replay} is not a folder (an unzipped ml-100k, ml-1m or "
                              "ratings.csv layout)")

    @property
    def events_total(self) -> int:
        return int(self.rate * self.duration_s)

    @property
    def sim_drift_every(self) -> int:
        return self.drift_every if self.drift_every is not None else max(1, self.events_total // 3)

    @property
    def sim_new_item_rate(self) -> float:
        if self.new_item_rate is not None:
            return self.new_item_rate
        return max(0.0005, 200.0 / max(self.events_total, 1))


@dataclass
class Child:
    """One child process of the demo."""

    name: str
    cmd: list[str]
    log: Path
    port: int | None = None  # its /metrics port
    proc: subprocess.Popen | None = None
    started_at: float | None = None
    ended_at: float | None = None
    returncode: int | None = None
    expected_exit: bool = False  # the demo asked it to stop (or it is the producer, done)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poll(self) -> int | None:
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is not None and self.returncode is None:
            self.returncode, self.ended_at = rc, time.time()
        return rc


def kafka_client(requested: str | None) -> str:
    """The Kafka client of the children: ``requested`` if given, else confluent-kafka when it
    is installed (librdkafka costs a fraction of kafka-python's CPU per record), else kafka-python."""
    if requested:
        return requested
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return "kafka-python"
    return "confluent"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class Demo:
    """One demo run: :meth:`run` blocks until it is over and returns the exit status.

    Parameters
    ----------
    config
        The settings.
    stream
        Where the live table goes (stderr).
    python
        Interpreter of the child processes.
    """

    def __init__(self, config: DemoConfig, *, stream: TextIO | None = None, python: str = sys.executable) -> None:
        self.config = config
        self.out = Path(config.out).resolve()  # children run elsewhere (the broker in its data dir)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.python = python
        self.children: dict[str, Child] = {}
        self.broker: Any = None
        self._broker_pid: int | None = None
        self.bootstrap: str | None = config.bootstrap_servers
        self.prefix = "towerstream"
        self.kafka_client = kafka_client(os.environ.get("TOWERSTREAM_KAFKA_CLIENT"))
        self.ports: dict[str, int] = {}
        self._stop = threading.Event()
        self._stop_reason: str | None = None
        self._phase = "setup"
        self._interruptible = False
        self._t0 = time.time()
        self._stream_t0: float | None = None
        self._offsets: Any = None  # consumer used for end offsets
        self._ts_fh: TextIO | None = None
        self._last: dict[str, dict[str, float]] = {}
        self._prev: tuple[float, dict[str, dict[str, float]]] | None = None
        self._produced_prev: tuple[float, int] | None = None
        self._table_lines = 0
        self._last_print = 0.0
        self._versions_seen: set[int] = set()
        self._item_first: dict[str, list[float]] = {}  # item -> [version, published_at]
        self._preexec = preexec_die_with_parent()
        self._learners_started = 0.0
        self.scrape_timeout_s = 8.0
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scrape")
        self._cpu: dict[str, float] = {}
        self.failures: list[str] = []

    # ------------------------------------------------------------------ paths
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "ckpt"

    @property
    def index_root(self) -> Path:
        return self.out / "index"

    def ckpt(self, learner: str) -> Path:
        return self.ckpt_dir / f"{learner}.ckpt"

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            self._stop_reason = f"{self._stop_reason}; {name} again"
            return
        self._stop_reason = f"{name} received"
        self._stop.set()
        if self._interruptible:
            raise KeyboardInterrupt  # leave a blocking wait (broker start, topic creation)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop the demo from another thread (as Ctrl-C does)."""
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """Run the demo to its end; 0 on a clean run, 1 when a child failed."""
        self.out.mkdir(parents=True, exist_ok=True)
        for sub in ("ckpt", "logs", "index"):
            (self.out / sub).mkdir(exist_ok=True)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        logging.getLogger("kafka").setLevel(logging.ERROR)  # its event-loop warnings would break the table
        self._t0 = time.time()
        try:
            try:
                self._setup()
                self._phase = "running"
                self._loop()
            except KeyboardInterrupt:
                self._stop_reason = self._stop_reason or "interrupted"
            finally:
                self._phase = "stopping"
                self._shutdown()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self._write_summary()
        if self.config.report:
            from app.report import write_report

            path = write_report(self.out)
            print(f"report: {path}", file=self.stream, flush=True)
        return 1 if self.failures else 0

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.config
        print(f"towerstream demo: run directory {self.out}", file=self.stream, flush=True)
        self._interruptible = True
        try:
            self._setup_kafka()
        finally:
            self._interruptible = False
        for name in cfg.learners:
            if self._stop.is_set():
                return
            port = self._port(name)
            self._start(name, self._learner_cmd(name), port=port)
        # The scorer waits for a checkpoint and an index by itself (holding requests until
        # then); starting it now overlaps its start-up with everyone else's.
        if not self._stop.is_set():
            port = self._port("scorer")
            self._start("scorer", self._scorer_cmd(), port=port)
        self._learners_started = time.monotonic()

    def _setup_kafka(self) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt
        if self.bootstrap is None:
            from streams.broker import BrokerConfig, LocalBroker

            # die_with_parent: even a SIGKILLed demo leaves no broker behind
            self.broker = LocalBroker(BrokerConfig.from_env(port=0, controller_port=0, data_dir=self.out / "broker"),
                                      die_with_parent=True)
            print("starting a local Kafka broker ...", file=self.stream, flush=True)
            self.bootstrap = self.broker.start()
            print(f"Kafka broker on {self.bootstrap} (pid {self.broker._proc.pid})", file=self.stream, flush=True)
        else:
            self.prefix = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        self._write_pids()
        from streams.topics import DEFAULT_PARTITIONS, ITEMS_PARTITIONS, Topics
        from streams.transport import KafkaSettings, ensure_topics, make_consumer

        settings = KafkaSettings.from_env(default_bootstrap=self.bootstrap)
        settings = KafkaSettings(self.bootstrap, self.kafka_client, settings.options)
        topics = Topics(prefix=self.prefix)
        ensure_topics(settings, {topics.events: DEFAULT_PARTITIONS, topics.requests: DEFAULT_PARTITIONS,
                                 topics.rankings: DEFAULT_PARTITIONS, topics.dead_letter: DEFAULT_PARTITIONS,
                                 topics.index_control: 1, topics.items: ITEMS_PARTITIONS})
        self.topics = topics
        self._offsets = make_consumer(settings, None)
        self._partitions = self._topic_partitions([topics.events, topics.requests])
        self._ts_fh = (self.out / "timeseries.jsonl").open("a", buffering=1)

    def _topic_partitions(self, names: list[str]) -> list[Any]:
        from streams.transport import TopicPartition

        out = []
        for t in names:
            for p in self._offsets.partitions_for(t):
                out.append(TopicPartition(t, p))
        return out

    def _port(self, name: str) -> int:
        port = _free_port()
        while port in self.ports.values():
            port = _free_port()
        self.ports[name] = port
        return port

    def _base(self, *args: str) -> list[str]:
        return [self.python, "-m", "app.cli", *args]

    def _learner_cmd(self, name: str) -> list[str]:
        return self._base("learn", "--learner", name, "--group", f"demo-{name}", "--checkpoint", str(self.ckpt(name)),
                          "--checkpoint-every", f"{self.config.checkpoint_every_s:g}",
                          "--bootstrap-servers", self.bootstrap, "--topic-prefix", self.prefix,
                          "--no-create-topics", "--quiet", "--metrics-port", str(self.ports[name]))

    def _producer_cmd(self) -> list[str]:
        cfg = self.config
        common = ["--bootstrap-servers", self.bootstrap, "--topic-prefix", self.prefix, "--rate", f"{cfg.rate:g}",
                  "--duration", f"{cfg.duration_s:g}", "--no-create-topics", "--quiet"]
        if not cfg.item_deltas:
            common.append("--no-item-events")
        if cfg.replay is not None:
            return self._base("produce", "replay", *common, "--path", str(cfg.replay), "--on-bad-line", "skip",
                              "--requests", "--truth-file", str(self.out / "truth.jsonl"))
        return self._base("produce", "simulate", *common, "--seed", str(cfg.seed),
                          "--drift-every", str(cfg.sim_drift_every), "--new-item-rate", f"{cfg.sim_new_item_rate:g}",
                          "--truth-file", str(self.out / "truth.jsonl"))

    def _indexer_cmd(self) -> list[str]:
        return self._base("index", "run", "--root", str(self.index_root),
                          "--checkpoint", str(self.ckpt(self.config.index_learner)),
                          "--period-s", f"{self.config.index_period_s:g}", "--keep", "100000", "--window", "5000",
                          "--bootstrap", self.bootstrap, "--topic-prefix", self.prefix,
                          "--metrics-port", str(self.ports["indexer"]))

    def _scorer_cmd(self) -> list[str]:
        # the model served is the one each index version was built from (serve's default):
        # one load per index period, shared with the item-delta follower
        return self._base("serve", "--index-root", str(self.index_root), "--bootstrap", self.bootstrap,
                          "--topic-prefix", self.prefix, "--host", "127.0.0.1", "--port", str(self.ports["scorer"]),
                          "--group", "demo-scorer", "--eval-group", "demo-scorer-eval",
                          # the scorer observes a batch's time for each request in it: small
                          # batches keep that close to one request's latency
                          "--score-batch", "16",
                          *(() if self.config.item_deltas else ("--no-item-deltas",)))

    def _start(self, name: str, cmd: list[str], port: int | None = None) -> Child:
        log = self.out / "logs" / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   KAFKA_BOOTSTRAP_SERVERS=self.bootstrap or "", TOWERSTREAM_KAFKA_CLIENT=self.kafka_client)
        repo = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        child = Child(name=name, cmd=cmd, log=log, port=port)
        preexec = self._preexec
        if name not in _REQUEST_PATH and self.config.batch_nice:
            preexec = _niced(self.config.batch_nice, self._preexec)
        with log.open("ab") as fh:
            child.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                          env=env, cwd=repo, process_group=0, preexec_fn=preexec)
        child.started_at = time.time()
        self.children[name] = child
        self._write_pids()
        logger.info("started %s (pid %d): %s", name, child.pid, " ".join(cmd))
        return child

    def _write_pids(self) -> None:
        if self.broker is not None and self.broker._proc is not None:
            self._broker_pid = self.broker._proc.pid
        if self.broker is not None and self.broker.config.port:  # resolved once started
            self.ports.setdefault("broker", self.broker.config.port)
            self.ports.setdefault("broker-controller", self.broker.config.controller_port)
        data = {
            "demo": os.getpid(),
            "broker": self._broker_pid,
            "children": {n: c.pid for n, c in self.children.items()},
            "ports": dict(self.ports),
            "bootstrap": self.bootstrap,
        }
        _write_json(self.out / "pids.json", data)

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> None:
        cfg = self.config
        drain_until: float | None = None
        next_tick = time.monotonic()
        while True:
            self._tick()
            if self._stop.is_set():
                break
            producer = self.children.get("producer")
            if producer is not None and producer.poll() is not None and drain_until is None:
                producer.expected_exit = True
                if producer.returncode != 0:
                    self.failures.append(f"producer exited with {producer.returncode} (see {producer.log})")
                    self._stop_reason = "the producer failed"
                    break
                drain_until = time.monotonic() + cfg.drain_s
            if producer is not None and drain_until is None and self._stream_t0 is not None \
                    and time.time() - self._stream_t0 > cfg.duration_s + 60.0:
                self._stop_reason = "the producer overran its duration by a minute"
                break
            if drain_until is not None and (time.monotonic() >= drain_until or self._caught_up()):
                self._stop_reason = "the stream ended" + ("" if self._caught_up() else
                                                          f"; learners still behind after {cfg.drain_s:g} s")
                break
            next_tick += cfg.refresh_s
            self._stop.wait(max(0.0, next_tick - time.monotonic()))
        self._final_scrape()

    def _caught_up(self) -> bool:
        for name in self.config.learners:
            lag = consumer_lag(self._last.get(name, {}))
            if lag is None or lag > 0:
                return False
        return True

    def _final_scrape(self) -> None:
        self._tick(final=True)

    def _tick(self, final: bool = False) -> None:
        now = time.time()
        self._check_children()
        self._start_pending()
        scraped: dict[str, dict[str, float]] = {}
        up: dict[str, bool] = {}
        targets = {n: c.port for n, c in self.children.items() if c.port is not None and c.alive()}
        pages = dict(zip(targets, self._pool.map(self._scrape, targets.values()))) if targets else {}
        for name, page in pages.items():
            up[name] = page is not None
            if page is not None:
                scraped[name] = page
                self._last[name] = page
        produced = self._produced()
        if self._stream_t0 is None and produced:
            self._stream_t0 = now  # the first events are out (within one refresh)
        self._poll_index()
        self._read_cpu()
        record = {"t": now, "elapsed": now - self._t0, "stream_elapsed": None if self._stream_t0 is None
                  else now - self._stream_t0, "final": final, "produced": produced, "up": up,
                  "cpu_s": dict(self._cpu), "metrics": scraped}
        if self._ts_fh is not None:
            self._ts_fh.write(json.dumps(record) + "\n")
        self._render(now, produced, final)
        self._prev = (now, {k: dict(v) for k, v in self._last.items()})

    def _scrape(self, port: int) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=self.scrape_timeout_s) as resp:
                return parse_metrics(resp.read().decode("utf-8"))
        except (OSError, ValueError, urllib.error.URLError) as exc:
            logger.debug("scrape of port %d failed: %s", port, exc)
            return None

    def _produced(self) -> int | None:
        if self._offsets is None or not self._partitions:
            return None
        try:
            ends = self._offsets.end_offsets(self._partitions)
        except Exception as exc:  # noqa: BLE001 - a failed probe only blanks one table cell
            logger.debug("end offsets failed: %s", exc)
            return None
        return int(sum(ends.values()))

    def _check_children(self) -> None:
        for name, child in self.children.items():
            rc = child.poll()
            if rc is not None and not child.expected_exit and name != "producer":
                child.expected_exit = True  # report once
                self.failures.append(f"{name} exited with {rc} during the run (see {child.log})")
                print(f"\n{name} exited with {rc}; last lines of {child.log}:\n{_tail(child.log)}",
                      file=self.stream, flush=True)

    def _read_cpu(self) -> None:
        """CPU seconds (user + system) of every live child and the broker, from /proc."""
        pids = {n: c.pid for n, c in self.children.items() if c.alive()}
        if self.broker is not None and self.broker._proc is not None and self.broker._proc.poll() is None:
            pids["broker"] = self.broker._proc.pid
        pids["demo"] = os.getpid()
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        for name, pid in pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                self._cpu[name] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                continue

    def _learners_up(self) -> bool:
        """Every consumer started so far answers /metrics (or has died, which is reported)."""
        return all(name in self._last or not c.alive() for name, c in self.children.items() if c.port is not None)

    def _start_pending(self) -> None:
        if self._stop.is_set() or self._phase != "running":
            return
        if "producer" not in self.children and (self._learners_up()
                                                 or time.monotonic() - self._learners_started > 180.0):
            self._start("producer", self._producer_cmd())
        if "indexer" not in self.children and self.ckpt(self.config.index_learner).exists():
            port = self._port("indexer")
            self._start("indexer", self._indexer_cmd(), port=port)

    def _poll_index(self) -> None:
        versions = self.index_root / "versions"
        if not versions.is_dir():
            return
        import numpy as np

        for d in sorted(versions.iterdir()):
            if not d.name.startswith("v") or not d.name[1:].isdigit():
                continue
            v = int(d.name[1:])
            if v in self._versions_seen:
                continue
            try:
                manifest = json.loads((d / "manifest.json").read_text())
                ids = np.load(d / "ids.npy", allow_pickle=False)
            except (OSError, ValueError) as exc:
                logger.debug("index version %s not readable yet: %s", d, exc)
                continue
            self._versions_seen.add(v)
            published = float(manifest.get("published_at") or manifest.get("created_at") or time.time())
            new = 0
            for item in ids.tolist():
                if item not in self._item_first:
                    self._item_first[item] = [v, published]
                    new += 1
            row = {"version": v, "published_at": published, "created_at": manifest.get("created_at"),
                   "seen_at": time.time(), "item_count": int(manifest.get("item_count", len(ids))),
                   "new_items": new, "recall": (manifest.get("recall") or {}).get("value"),
                   "auc": (manifest.get("quality") or {}).get("auc"),
                   "events_learned": (manifest.get("checkpoint") or {}).get("events_learned"),
                   "build_seconds": (manifest.get("build_seconds") or {}).get("total")}
            with (self.out / "index_versions.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        _write_json(self.out / "index_items.json", self._item_first)

    # ------------------------------------------------------------------ table
    def _rate(self, name: str, key: str, now: float) -> float | None:
        if self._prev is None:
            return None
        t_prev, prev = self._prev
        a, b = prev.get(name, {}).get(key), self._last.get(name, {}).get(key)
        if a is None or b is None or now <= t_prev:
            return None
        return max(0.0, (b - a) / (now - t_prev))

    def _render(self, now: float, produced: int | None, final: bool) -> None:
        cfg = self.config
        if not final and not self.tty and now - self._last_print < 10.0:
            return
        self._last_print = now
        lines = []
        el = 0.0 if self._stream_t0 is None else now - self._stream_t0
        if produced is not None:
            rate = "-"
            if self._produced_prev is not None and now > self._produced_prev[0]:
                rate = f"{(produced - self._produced_prev[1]) / (now - self._produced_prev[0]):,.0f}/s"
            self._produced_prev = (now, produced)
            prod = f"produced {produced:,} events ({rate})"
        else:
            prod = "produced -"
        lines.append(f"towerstream demo  {el:5.0f} s / {cfg.duration_s:g} s  {prod}  "
                     f"target {cfg.rate:g}/s  kafka {self.bootstrap}{'  [final]' if final else ''}")
        lines.append(f"  {'learner':<10} {'learned':>10} {'ev/s':>7} {'lag':>8} {'AUC':>7} {'rolling':>7} "
                     f"{'logloss':>7}  state")
        for name in cfg.learners:
            m = self._last.get(name, {})
            lbl = {"learner": name}
            learned = m.get(sample_key("towerstream_model_events_learned", lbl))
            r = self._rate(name, sample_key("towerstream_events_learned_total", lbl), now)
            lag = consumer_lag(m)
            auc = m.get(sample_key("towerstream_prequential_auc", {**lbl, "window": "all"}))
            roll = m.get(sample_key("towerstream_prequential_auc", {**lbl, "window": "rolling"}))
            ll = m.get(sample_key("towerstream_prequential_logloss", {**lbl, "window": "all"}))
            lines.append(f"  {name:<10} {_f(learned, ',.0f'):>10} {_f(r, ',.0f'):>7} {_f(lag, ',.0f'):>8} "
                         f"{_f(auc, '.4f'):>7} {_f(roll, '.4f'):>7} {_f(ll, '.4f'):>7}  {self._state(name)}")
        m = self._last.get("indexer", {})
        lines.append(f"  index      version {_f(m.get('towerstream_index_version'), '.0f')}  "
                     f"age {_f(m.get('towerstream_index_age_seconds'), '.0f')} s  "
                     f"items {_f(m.get('towerstream_index_items'), ',.0f')}  "
                     f"builds {_f(m.get('towerstream_index_builds_total'), '.0f')} "
                     f"(refused {_f(m.get('towerstream_index_refused_builds_total'), '.0f')}, "
                     f"failed {_f(m.get('towerstream_index_failed_builds_total'), '.0f')})  {self._state('indexer')}")
        m = self._last.get("scorer", {})
        ok = m.get(sample_key("towerstream_requests_total", {"source": "kafka", "outcome": "ok"}))
        total = sum(v for k, v in m.items() if k.startswith("towerstream_requests_total")) if m else None
        p99 = histogram_quantile(0.99, latency_buckets(m)) if m else math.nan
        online_key = sample_key("towerstream_online_auc", {"learner": cfg.index_learner})
        lines.append(f"  scorer     answered {_f(ok, ',.0f')} of {_f(total, ',.0f')} requests  "
                     f"p99 {_f(p99 * 1e3 if not math.isnan(p99) else None, '.1f')} ms  "
                     f"index v{_f(m.get('towerstream_index_version'), '.0f')}"
                     f"+{_f(m.get('towerstream_index_delta_seq'), '.0f')} items  "
                     f"fresh p90 {_f(_fresh_p90(m), '.2f')} s  "
                     f"online AUC {_f(m.get(online_key), '.4f')}"
                     f"  {self._state('scorer')}")
        if self.tty and self._table_lines:
            self.stream.write(f"\x1b[{self._table_lines}A\x1b[J")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._table_lines = len(lines) if self.tty else 0

    def _state(self, name: str) -> str:
        child = self.children.get(name)
        if child is None:
            return "waiting"
        if child.alive():
            return "running" if name in self._last or child.port is None else "starting"
        return f"exited {child.returncode}"

    # ------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        # the source first, then what reads the learners' checkpoints, then the learners
        for group in (("producer",), ("scorer", "indexer"), tuple(self.config.learners)):
            self._stop_group([self.children[n] for n in group if n in self.children])
        if self._offsets is not None:
            try:
                self._offsets.close()
            except Exception as exc:  # noqa: BLE001 - closing must go on to the broker
                logger.warning("closing the offsets consumer failed: %s", exc)
            self._offsets = None
        if self._ts_fh is not None:
            self._ts_fh.close()
            self._ts_fh = None
        self._pool.shutdown(wait=True)
        if self.broker is not None:
            print("stopping the Kafka broker ...", file=self.stream, flush=True)
            self.broker.stop()
        self._write_pids()
        still = [p for p in self.ports.values() if port_listening(p)]
        if still:
            logger.warning("ports still listening after shutdown: %s", still)

    def _stop_group(self, group: list[Child], timeout_s: float = 30.0) -> None:
        live = [c for c in group if c.alive()]
        for c in live:
            c.expected_exit = True
            try:
                os.kill(c.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        for c in live:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{c.name} (pid {c.pid}) did not stop within {timeout_s:g} s: SIGKILL", file=self.stream)
                try:
                    os.killpg(c.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                c.proc.wait(timeout=10)
            c.poll()
        for c in group:
            c.poll()
            # a process group may hold grandchildren: make sure none survives
            try:
                os.killpg(c.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, TypeError):
                pass

    def _write_summary(self) -> None:
        cfg = self.config
        data = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "mode": "replay" if cfg.replay is not None else "simulator",
            "drift_every": None if cfg.replay is not None else cfg.sim_drift_every,
            "new_item_rate": None if cfg.replay is not None else cfg.sim_new_item_rate,
            "bootstrap": self.bootstrap,
            "local_broker": self.broker is not None,
            "kafka_client": self.kafka_client,
            "topic_prefix": self.prefix,
            "started_at": self._t0,
            "stream_started_at": self._stream_t0,
            "ended_at": time.time(),
            "wall_s": time.time() - self._t0,
            "stop_reason": self._stop_reason,
            "failures": self.failures,
            "children": {n: {"pid": c.pid, "cmd": c.cmd, "returncode": c.returncode, "started_at": c.started_at,
                             "ended_at": c.ended_at, "port": c.port, "log": str(c.log)}
                         for n, c in self.children.items()},
            "ports": self.ports,
            "machine": machine_info(),
        }
        _write_json(self.out / "demo.json", data)
        print(f"demo over after {data['wall_s']:.0f} s ({self._stop_reason}); "
              f"{'failures: ' + '; '.join(self.failures) if self.failures else 'no failures'}",
              file=self.stream, flush=True)


#: The children a request passes through (the broker is not a child): never niced.
_REQUEST_PATH = frozenset({"scorer", "producer"})


def _niced(increment: int, then: Callable[[], None] | None) -> Callable[[], None]:
    """A ``preexec_fn`` that lowers the child's CPU priority by ``increment``, then runs ``then``."""
    def setup() -> None:
        os.nice(increment)
        if then is not None:
            then()

    return setup


def _f(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _fresh_p90(metrics: dict[str, float]) -> float | None:
    """p90 of the scorer's item-delta freshness histogram so far (None: no sample yet)."""
    buckets = freshness_buckets(metrics)
    if not buckets or not buckets[-1][1]:
        return None
    return histogram_quantile(0.9, buckets)
