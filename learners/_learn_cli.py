"""``towerstream learn``: feed one learner from the Kafka click stream, with checkpoints.

Reads ``<prefix>.events`` in its own consumer group, predicts each impression before
learning it (prequential AUC), checkpoints the model with its offsets, and commits.
Restarted with the same ``--checkpoint`` it continues exactly where the checkpoint
stopped. SIGTERM or Ctrl-C finish the batch in hand, checkpoint and exit 0.

Examples::

    towerstream learn --learner ctr --checkpoint ckpt/ctr.ckpt
    towerstream learn --learner lr --param bits=20 --param optimizer='"ftrl"' \\
        --checkpoint ckpt/lr.ckpt --checkpoint-every 10 --idle-timeout 30
    towerstream learn --checkpoint ckpt/lr.ckpt      # resume: learner and params from the checkpoint

Kafka settings: ``--bootstrap-servers`` / ``--kafka-client`` override
``KAFKA_BOOTSTRAP_SERVERS`` / ``TOWERSTREAM_KAFKA_CLIENT``; client options (security)
come from ``TOWERSTREAM_KAFKA_OPTIONS`` (JSON).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from streams.errors import ConfigError

__all__ = ["register"]


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``learn`` subcommand to ``subparsers``."""
    p = subparsers.add_parser("learn", help="learn online from the Kafka click stream, with checkpoints",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learner", default=None,
                   help="registry name: ctr, lr, river-lr, two-tower, ... (default: the checkpoint's)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="learner parameter (VALUE is JSON if it parses, else a string); repeatable")
    p.add_argument("--bootstrap-servers", default=None,
                   help="Kafka host:port[,...] (default: $KAFKA_BOOTSTRAP_SERVERS or localhost:9092)")
    p.add_argument("--kafka-client", choices=("kafka-python", "confluent"), default=None,
                   help="Kafka client library (default: $TOWERSTREAM_KAFKA_CLIENT or kafka-python)")
    p.add_argument("--group", default=None, help="consumer group (default: towerstream-learner-<learner>)")
    p.add_argument("--topic-prefix", default="towerstream", help="topic name prefix (default: towerstream)")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                   help="checkpoint file: resumed from when present, rewritten as the model learns")
    p.add_argument("--batch-size", type=int, default=1000, help="records per micro-batch (default 1000)")
    p.add_argument("--checkpoint-every", type=float, default=30.0, metavar="SECONDS",
                   help="checkpoint at least this often while learning (default 30)")
    p.add_argument("--checkpoint-every-n", type=int, default=None, metavar="EVENTS",
                   help="also checkpoint after this many events learned")
    p.add_argument("--max-events", type=int, default=None, metavar="N", help="stop after learning N events")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop after this long without a record")
    p.add_argument("--no-create-topics", action="store_true",
                   help="do not create the events and dead-letter topics when they are missing")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--default-gc", action="store_true",
                   help="keep Python's default garbage-collector thresholds (see streams.consumer.tune_gc)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics, /healthz and /readyz on this port (0: any free port)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the two-tower's mini-batches are small, and with "
                        "torch's default of one thread per core the learner ran 7x slower on a busy 2-core "
                        "machine, 5.4k vs 39.6k events/s in benchmarks/bench_kafka.py)")
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="train one model with N ranks launched by torchrun (see learners.distributed)")
    p.add_argument("--group-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="with --world-size: how long a rank waits for the group or a step (default 60)")
    p.set_defaults(func=_run)


def _params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--param {item!r}: write NAME=VALUE, e.g. --param half_life=500")
        try:
            value: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            value = raw
        out[name.strip()] = value
    return out


def _check(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be >= 0 seconds, got {args.checkpoint_every}")
    if args.checkpoint_every_n is not None and args.checkpoint_every_n < 1:
        raise ConfigError(f"--checkpoint-every-n must be >= 1, got {args.checkpoint_every_n}")
    if args.max_events is not None and args.max_events < 0:
        raise ConfigError(f"--max-events must be >= 0, got {args.max_events}")
    if args.idle_timeout is not None and args.idle_timeout < 0:
        raise ConfigError(f"--idle-timeout must be >= 0 seconds, got {args.idle_timeout}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")


def _learner(args: argparse.Namespace) -> Any:
    from learners.checkpoint import load_checkpoint
    from learners.registry import make_learner

    params = _params(args.param)
    if args.checkpoint is not None and args.checkpoint.exists():
        spec = load_checkpoint(args.checkpoint).spec
        if args.learner in (None, spec["name"]) and not params:
            return make_learner(spec["name"], **spec.get("params", {}))
    if args.learner is None:
        raise ConfigError("--learner is required (or --checkpoint of an existing checkpoint to resume)")
    return make_learner(args.learner, **params)


def _run(args: argparse.Namespace) -> int:
    from learners.runtime import StreamLearnerRuntime
    from streams.topics import DEFAULT_PARTITIONS, Topics
    from streams.transport import KafkaSettings, ensure_topics

    _check(args)
    import torch

    torch.set_num_threads(args.threads)
    settings = KafkaSettings.from_env(default_bootstrap="localhost:9092")
    if args.bootstrap_servers or args.kafka_client:
        settings = KafkaSettings(args.bootstrap_servers or settings.bootstrap_servers,
                                 args.kafka_client or settings.client, settings.options)
    learner = _learner(args)
    name = learner.spec["name"]
    group = args.group or f"towerstream-learner-{name}"
    topics = Topics(prefix=args.topic_prefix)
    if not args.no_create_topics:
        ensure_topics(settings, {topics.events: DEFAULT_PARTITIONS, topics.dead_letter: DEFAULT_PARTITIONS})

    if args.world_size != 1:
        return _run_distributed(args, settings, learner, group, topics)
    progress = None if args.quiet else _Progress(sys.stderr)
    runtime = StreamLearnerRuntime(
        settings, learner, group, topics, args.checkpoint,
        checkpoint_every_s=args.checkpoint_every, checkpoint_every_n=args.checkpoint_every_n,
        batch_size=args.batch_size, max_events=args.max_events, idle_timeout_s=args.idle_timeout,
        stats_every_s=1.0, on_progress=progress,
    )
    runtime.install_signal_handlers()
    if not args.default_gc:
        from streams.consumer import tune_gc

        tune_gc()
    if runtime.resumed_from is not None:
        ck = runtime.resumed_from
        print(f"resuming {name} from {args.checkpoint}: {ck.events_learned:,} events learned, "
              f"checkpoint of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ck.created_at))}",
              file=sys.stderr)
    server = None
    if args.metrics_port is not None:
        from prometheus_client import REGISTRY

        from learners.prometheus import LearnerStatsCollector, learner_ready
        from streams.exposition import start_metrics_server

        REGISTRY.register(LearnerStatsCollector(runtime, topic=topics.events))
        server = start_metrics_server(args.metrics_port, ready=learner_ready(runtime))
    try:
        stats = runtime.run()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if progress is not None:
        progress.done()
    _summary(stats, topics, args.checkpoint)
    return 0


def _run_distributed(args: argparse.Namespace, settings: Any, learner: Any, group: str, topics: Any) -> int:
    """One rank of ``--world-size N`` (torchrun starts N of these)."""
    import torch.distributed as dist

    from learners.distributed import DistributedLearnerRuntime, init_group

    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    if args.metrics_port is not None:
        raise ConfigError("--metrics-port is not served by --world-size ranks yet: leave it out")
    rank, world = init_group(args.world_size, timeout_s=args.group_timeout)
    try:
        runtime = DistributedLearnerRuntime(
            settings, learner, group, topics, args.checkpoint, batch_size=args.batch_size,
            checkpoint_every_n=args.checkpoint_every_n, checkpoint_every_s=args.checkpoint_every,
            max_events=args.max_events, idle_timeout_s=args.idle_timeout)
        runtime.install_signal_handlers()
        stats = runtime.run()
        print(f"rank {rank}/{world}: {stats.events_learned_run:,} events learned by the group this run, "
              f"{stats.events_learned:,} in all, {runtime._steps:,} steps, model {runtime.digest()[:16]}, "
              f"all-reduce {runtime.bytes_per_step:,} bytes/step, {runtime.comm_s:.2f} s in sync")
    finally:
        dist.destroy_process_group()
    return 0


def _fmt(value: float | int | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


class _Progress:
    """The live progress line: rewritten in place on a terminal, one line per 10 s otherwise."""

    def __init__(self, stream: Any, every_s: float = 10.0) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every_s = every_s
        self._last = 0.0
        self._shown = False

    def __call__(self, stats: Any) -> None:
        m = stats.metrics
        line = (f"{stats.events_learned:,} learned  {stats.events_per_s:,.0f} events/s  "
                f"AUC {_fmt(m.get('auc'))} (rolling {_fmt(m.get('rolling_auc'))})  "
                f"lag {_fmt(stats.total_lag, ',')}  dead-lettered {stats.dead_lettered:,}")
        if self.tty:
            self.stream.write("\r" + line + "   ")
            self._shown = True
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()


def _summary(stats: Any, topics: Any, checkpoint: Path | None) -> None:
    m = stats.metrics
    print(f"learner {stats.learner} (group {stats.group_id}) on {topics.events}:")
    print(f"  learned      {stats.events_learned_run:,} events this run, {stats.events_learned:,} in all "
          f"({stats.events_per_s_run:,.0f} events/s over {stats.elapsed_s:.1f} s)")
    print(f"  records      {stats.records:,} read: {stats.skipped:,} clicks/requests skipped, "
          f"{stats.dead_lettered:,} dead-lettered to {topics.dead_letter}, {stats.duplicates:,} duplicates skipped")
    print(f"  prequential  AUC {_fmt(m.get('auc'))}  logloss {_fmt(m.get('logloss'))}  "
          f"rolling AUC {_fmt(m.get('rolling_auc'))}  ({_fmt(m.get('n'), ',')} predictions)")
    print(f"  lag          {_fmt(stats.total_lag, ',')} records behind")
    if checkpoint is not None:
        print(f"  checkpoint   {checkpoint} ({stats.checkpoints} written this run)")
