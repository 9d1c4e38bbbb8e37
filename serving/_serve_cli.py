"""``towerstream serve``: the scorer process (Kafka request loop + HTTP + /metrics).

Serves the indexer's current version (hot-swapped on announcements) with the model it
was built from (or, with ``--checkpoint``, the newest learner checkpoint, reloaded when
a newer one appears), consumes request events and
produces ranked lists, follows impressions and clicks for online AUC, and serves
``/recommend``, ``/healthz``, ``/readyz`` and ``/metrics`` on one port. Without
``--bootstrap`` (and ``KAFKA_BOOTSTRAP_SERVERS`` unset) it serves HTTP only.

Example::

    towerstream serve --index-root runs/index \\
        --bootstrap localhost:9092 --port 8080
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from streams.errors import ConfigError
from streams.shutdown import STOP_DEADLINE_S, exit_if_still_stopping
from streams.topics import Topics
from streams.transport import KafkaSettings

__all__ = ["register"]

FULL_GC_EVERY = 100  # second-generation collections between full ones (Python's default: 10)


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``serve`` subcommand to ``subparsers``."""
    p = subparsers.add_parser("serve", help="score requests from Kafka and HTTP; export /metrics",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-from", choices=("index", "checkpoint"), default=None, dest="model_from",
                   help="index: serve the model each index version was built from (user vectors in the space "
                        "of the item vectors searched; one load per version); checkpoint: the newest learner "
                        "checkpoint (fresher pre-ranking). Default: checkpoint when --checkpoint is given, "
                        "else index")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="learner checkpoint file, or a directory of them (newest *.ckpt is served): "
                        "the served model with --model-from checkpoint")
    p.add_argument("--checkpoint-pattern", default="*.ckpt", help="checkpoint file glob inside a directory")
    p.add_argument("--index-root", type=Path, required=True, help="the indexer's artifact store root")
    p.add_argument("--bootstrap-servers", "--bootstrap", dest="bootstrap", default=None,
                   help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP_SERVERS; none: HTTP only)")
    p.add_argument("--kafka-client", choices=("kafka-python", "confluent"), default=None,
                   help="Kafka client (default $TOWERSTREAM_KAFKA_CLIENT or kafka-python)")
    p.add_argument("--topic-prefix", default="towerstream", help="topic name prefix of the deployment")
    p.add_argument("--host", default="0.0.0.0", help="HTTP bind address")
    p.add_argument("--port", type=int, default=8080, help="HTTP port for /recommend, /readyz, /metrics")
    p.add_argument("--k-retrieve", type=int, default=100, help="ANN candidates per request")
    p.add_argument("--k", type=int, default=10, dest="k_default", help="items returned when a request says none")
    p.add_argument("--group", default="towerstream-scorer", help="consumer group of the request loop")
    p.add_argument("--eval-group", default="towerstream-scorer-eval", help="consumer group of the events follower")
    p.add_argument("--no-online-eval", action="store_true", help="do not follow the events topic")
    p.add_argument("--no-item-deltas", action="store_true",
                   help="do not apply item events (<prefix>.items) to the served index between rebuilds")
    p.add_argument("--default-gc", action="store_true",
                   help="keep Python's default garbage-collector settings (by default the objects built at "
                        "start-up are frozen: a full collection would rescan them, a stall of every request)")
    p.add_argument("--catalogue", type=Path, default=None, help="JSON-lines item catalogue (pre-rank features)")
    p.add_argument("--shadow", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="also evaluate this learner online on served traffic (repeatable)")
    p.add_argument("--eval-window", type=float, default=60.0, help="seconds (event time) a click may trail its impression")
    p.add_argument("--score-batch", type=int, default=64, help="requests scored together")
    p.add_argument("--checkpoint-poll", type=float, default=1.0, dest="checkpoint_poll_s", metavar="SECONDS",
                   help="seconds between looks for a newer checkpoint (default 1)")
    p.add_argument("--commit-interval", type=float, default=1.0, dest="commit_interval_s",
                   help="seconds between flush+commit of the request loop (0: after every batch)")
    p.add_argument("--switch-interval-ms", type=float, default=0.5, dest="switch_interval_ms", metavar="MS",
                   help="Python's GIL switch interval in this process (default 0.5 ms; Python's own is 5 ms): "
                        "a request thread waiting for the GIL held by the events follower waits up to this "
                        "long each time it takes the GIL back after torch, FAISS or Kafka released it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and FAISS threads (default 1: the towers are small, a single query does "
                        "not parallelise, and the HTTP and Kafka threads need the other cores)")
    p.set_defaults(func=_serve)


def _shadows(values: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--shadow {v!r}: write NAME=CHECKPOINT, e.g. --shadow lr=runs/lr/")
        out[name] = Path(path)
    return out


def _kafka(args: argparse.Namespace) -> KafkaSettings | None:
    bootstrap = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        return None
    settings = KafkaSettings.from_env(default_bootstrap=bootstrap)
    if args.bootstrap:
        settings = KafkaSettings(args.bootstrap, settings.client, settings.options)
    if args.kafka_client:
        settings = settings.with_client(args.kafka_client)
    return settings


def _serve(args: argparse.Namespace) -> int:
    from serving.app import ServeConfig, ServingApp

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if not 0.01 <= args.switch_interval_ms <= 100:
        raise ConfigError(f"--switch-interval-ms must be in 0.01..100 (milliseconds), got {args.switch_interval_ms:g}")
    sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)  # idle OpenMP threads spin: keep single queries on one
    config = ServeConfig(
        checkpoint=args.checkpoint, model_from=args.model_from, index_root=args.index_root, kafka=_kafka(args),
        topics=Topics(prefix=args.topic_prefix), host=args.host, port=args.port,
        k_retrieve=args.k_retrieve, k_default=args.k_default, group_id=args.group,
        eval_group_id=args.eval_group, checkpoint_pattern=args.checkpoint_pattern,
        catalogue=args.catalogue, shadows=_shadows(args.shadow), eval_window_s=args.eval_window,
        score_batch=args.score_batch, commit_interval_s=args.commit_interval_s,
        checkpoint_poll_s=args.checkpoint_poll_s,
        online_eval=not args.no_online_eval, item_deltas=not args.no_item_deltas,
    )
    app = ServingApp(config)

    def on_term(signum: int, frame: FrameType | None) -> None:
        app.request_stop()  # SIGTERM (docker stop, Kubernetes): finish the batch in hand, exit 0

    signal.signal(signal.SIGTERM, on_term)
    app.start()
    if not args.default_gc:
        from streams.consumer import tune_gc

        # torch, FAISS and the loaded model are ~300k objects that a full collection rescans
        # (80-300 ms, every request waits); frozen, they are never scanned again, nor are the
        # model and index that arrive later (freeze_gc_when_warm). Python's young thresholds
        # (700, 10): a collection every few hundred allocations, 0.1 ms (1.2 ms for the second
        # generation), instead of the learners' 50,000 (25-37 ms each, measured in the demo);
        # full collections 10x rarer than Python's default, ~20 ms each.
        tune_gc(None, full_every=FULL_GC_EVERY)
        app.freeze_gc_when_warm()
    print(f"towerstream serve: http://{args.host}:{app.port}  (/recommend /healthz /readyz /metrics); "
          f"kafka: {config.kafka.bootstrap_servers if config.kafka else 'off'}", file=sys.stderr, flush=True)
    try:
        app.wait()
    finally:
        # a gone broker can block the final commit or the clients' close for ever
        exit_if_still_stopping(STOP_DEADLINE_S, "towerstream serve")
        app.stop()
    return 0
