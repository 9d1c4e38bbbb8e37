"""``towerstream index run|build-once|list|rollback``: the background indexer from the command line.

``run`` follows the events topic into the catalogue (and a held-out window), builds every
``--period-s`` seconds or every ``--every-n-updates`` learned events, and announces each
published version on the control topic. ``build-once`` builds and publishes one version
(offline: catalogue and held-out events from files). ``list`` shows the versions on disk
(``*`` marks the served one); ``rollback VERSION [--pin]`` serves an earlier version
again (``--pin`` stops builders from publishing until ``unpin``).

Kafka comes from ``--bootstrap`` or ``KAFKA_BOOTSTRAP_SERVERS`` (plus
``TOWERSTREAM_KAFKA_CLIENT`` and ``TOWERSTREAM_KAFKA_OPTIONS``); without either,
``build-once`` and ``rollback`` do not announce.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from indexer.announce import Announcement, Announcer, ensure_control_topic
from indexer.artifacts import ArtifactStore
from indexer.build import BuildConfig
from indexer.catalogue import Catalogue
from indexer.evaluation import RetrievalEvaluator
from indexer.follow import RecentWindow, StreamFollower
from indexer.guardrail import Guardrail, GuardrailConfig
from indexer.service import FileCheckpointSource, FrozenModel, IndexerService
from learners.base import X, event_to_x
from streams.errors import ConfigError
from streams.events import decode_event
from streams.shutdown import STOP_DEADLINE_S, exit_if_still_stopping
from streams.topics import ITEMS_PARTITIONS, Topics
from streams.transport import KafkaSettings, ensure_topics, make_producer

__all__ = ["register"]


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``index`` subcommand (``run``, ``build-once``, ``list``, ``rollback``, ``unpin``)."""
    index = subparsers.add_parser("index", help="build, publish, list and roll back FAISS index versions",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = index.add_subparsers(dest="index_action", metavar="ACTION")
    actions.required = True

    def root(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", type=Path, required=True, help="artifact store directory")

    def kafka(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bootstrap-servers", "--bootstrap", dest="bootstrap", default=None,
                       help="Kafka host:port[,...] (default $KAFKA_BOOTSTRAP_SERVERS)")
        p.add_argument("--topic-prefix", default="towerstream", help="topic name prefix (default towerstream)")

    def build(p: argparse.ArgumentParser) -> None:
        root(p)
        kafka(p)
        p.add_argument("--checkpoint", type=Path, required=True, help="the learner's checkpoint file")
        p.add_argument("--catalogue", type=Path, default=None,
                       help='JSON lines {"item_id": ..., "item_features": {...}} indexed besides the stream')
        p.add_argument("--keep", type=int, default=5, help="versions to retain (default 5)")
        p.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"])
        p.add_argument("--flat-threshold", type=int, default=50_000, help="items below which the index is exact")
        p.add_argument("--recall-k", type=int, default=100)
        p.add_argument("--recall-target", type=float, default=0.95, help="nprobe is tuned to reach this recall@K")
        p.add_argument("--min-recall", type=float, default=0.90, help="guardrail: refuse below this recall@K")
        p.add_argument("--max-auc-drop", type=float, default=0.02, help="guardrail: allowed held-out AUC drop")
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads of the item tower (default 1: its small layers gain nothing from a "
                            "second thread, which costs CPU the learners and the scorer need); FAISS keeps its own")

    run = actions.add_parser("run", help="follow the stream and rebuild periodically (until Ctrl-C)")
    build(run)
    run.add_argument("--period-s", type=float, default=60.0, help="seconds between builds (default 60)")
    run.add_argument("--every-n-updates", type=int, default=None, help="also build after this many learned events")
    run.add_argument("--window", type=int, default=20_000, help="held-out impressions kept for the AUC check")
    run.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                     help="serve Prometheus /metrics, /healthz and /readyz on this port (0: any free port)")
    run.set_defaults(func=_run)

    once = actions.add_parser("build-once", help="build, guard, publish (and announce) one version")
    build(once)
    once.add_argument("--held-out", type=Path, default=None,
                      help="JSON-lines events; their labelled impressions are the AUC check's window")
    once.set_defaults(func=_build_once)

    listing = actions.add_parser("list", help="list the versions on disk")
    root(listing)
    listing.set_defaults(func=_list)

    rollback = actions.add_parser("rollback", help="serve an earlier version again (and announce it)")
    root(rollback)
    kafka(rollback)
    rollback.add_argument("version", type=int, help="the version to serve")
    rollback.add_argument("--pin", action="store_true",
                          help="keep serving it: builders skip publishing until `towerstream index unpin`")
    rollback.set_defaults(func=_rollback)

    unpin = actions.add_parser("unpin", help="let builders publish again after `rollback --pin`")
    root(unpin)
    unpin.set_defaults(func=_unpin)


def _settings(args: argparse.Namespace, required: bool) -> KafkaSettings | None:
    """``--bootstrap`` (or ``KAFKA_BOOTSTRAP_SERVERS``), client and options from the environment."""
    try:
        env = KafkaSettings.from_env(default_bootstrap=args.bootstrap)
    except ConfigError:
        if required:
            raise
        return None
    return KafkaSettings(args.bootstrap, env.client, env.options) if args.bootstrap else env


def _service(args: argparse.Namespace, announcer: Announcer | None, held_out: Any) -> IndexerService:
    if not 0 < args.recall_target <= 1:
        raise ConfigError(f"--recall-target must be in (0, 1], got {args.recall_target}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    import torch  # CLI glue: the service itself never sets process-wide threads

    torch.set_num_threads(args.threads)
    catalogue = Catalogue()
    if args.catalogue is not None:
        catalogue.load_jsonl(args.catalogue)
    return IndexerService(
        ArtifactStore(args.root, keep=args.keep),
        catalogue,
        FileCheckpointSource(args.checkpoint),
        build_config=BuildConfig(kind=args.kind, flat_threshold=args.flat_threshold, recall_k=args.recall_k,
                                 recall_target=args.recall_target),
        guardrail=Guardrail(GuardrailConfig(min_recall=args.min_recall, max_auc_drop=args.max_auc_drop)),
        announcer=announcer,
        held_out=held_out,
        period_s=getattr(args, "period_s", 60.0),
        every_n_updates=getattr(args, "every_n_updates", None),
    )


def _read_held_out(path: Path) -> tuple[list[X], np.ndarray]:
    xs: list[X] = []
    ys: list[int] = []
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            event = decode_event(line)
            if event.kind == "impression" and event.label is not None:
                xs.append(event_to_x(event))
                ys.append(event.label)
    return xs, np.asarray(ys, dtype=np.int64)


def _print_outcome(outcome: Any) -> int:
    if outcome.status == "published":
        m = outcome.manifest
        print(f"published version {outcome.version}: {m['item_count']} items, {m['index']['kind']} "
              f"{m['index']['params']}, recall@{m['recall']['k']}={m['recall']['value']:.3f}, "
              f"auc={m['quality']['auc']}, {outcome.seconds:.2f} s")
        return 0
    print(f"{outcome.status}: {'; '.join(outcome.reasons)}", file=sys.stderr)
    return 0 if outcome.status == "skipped" else 1


def _build_once(args: argparse.Namespace) -> int:
    settings = _settings(args, required=False)
    topics = Topics(prefix=args.topic_prefix)
    held: tuple[list[X], np.ndarray] | None = _read_held_out(args.held_out) if args.held_out else None
    producer = None
    announcer = None
    if settings is not None:
        ensure_control_topic(settings, topics)
        producer = make_producer(settings)
        announcer = Announcer(producer, topics)
    try:
        service = _service(args, announcer, None if held is None else (lambda _m: held))
        return _print_outcome(service.build_once(trigger="cli"))
    finally:
        if producer is not None:
            producer.close()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args, required=True)
    assert settings is not None
    topics = Topics(prefix=args.topic_prefix)
    ensure_control_topic(settings, topics)
    ensure_topics(settings, {topics.items: ITEMS_PARTITIONS})  # item events: catalogue + covered_seq
    window = RecentWindow(maxlen=args.window)
    producer = make_producer(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, _raise_interrupt)

    def held_out(model: FrozenModel) -> tuple[list[X], np.ndarray]:
        return window.held_out(model.offsets)

    service = _service(args, Announcer(producer, topics), held_out)
    service.retrieval = RetrievalEvaluator(popularity=window.learned_clicks)  # Recall/HR/NDCG@K per version
    server = None
    if args.metrics_port is not None:
        from prometheus_client import REGISTRY

        from indexer.prometheus import IndexerStatsCollector, indexer_ready
        from streams.exposition import start_metrics_server

        REGISTRY.register(IndexerStatsCollector(service))
        server = start_metrics_server(args.metrics_port, ready=indexer_ready(service))
    follower = StreamFollower(settings, service.catalogue, window, topics=topics).start()
    print(f"indexing into {args.root} every {args.period_s:g} s; Ctrl-C stops", file=sys.stderr)
    try:
        service.run(stop)
    except KeyboardInterrupt:
        stop.set()
    finally:
        exit_if_still_stopping(STOP_DEADLINE_S, "towerstream index run")  # a gone broker can block the close
        follower.stop()
        producer.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    m = service.metrics
    print(f"stopped: {m.builds_total} published, {m.refused_total} refused, {m.failed_total} failed", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    store = ArtifactStore(args.root)
    current = store.current()
    versions = store.list_versions()
    if not versions:
        print(f"no versions under {args.root}")
        return 0
    print(f"{'':1} {'version':>7} {'items':>9} {'kind':>8} {'recall':>7} {'auc':>6} {'build_s':>7}  created")
    for v in versions:
        m = v.manifest
        recall = m.get("recall", {}).get("value")
        auc = m.get("quality", {}).get("auc")
        build_s = m.get("build_seconds", {}).get("total")
        created = _dt.datetime.fromtimestamp(m.get("created_at", 0), tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{'*' if v.version == current else '':1} {v.version:>7} {m.get('item_count', 0):>9} "
              f"{m.get('index', {}).get('kind', '?'):>8} {'-' if recall is None else f'{recall:.3f}':>7} "
              f"{'-' if auc is None else f'{auc:.3f}':>6} {'-' if build_s is None else f'{build_s:.2f}':>7}  {created}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    store = ArtifactStore(args.root)
    previous = store.current()
    info = store.rollback(args.version, pin=args.pin)
    settings = _settings(args, required=False)
    if settings is not None:
        topics = Topics(prefix=args.topic_prefix)
        ensure_control_topic(settings, topics)
        producer = make_producer(settings)
        try:
            Announcer(producer, topics).announce(Announcement.for_version(info, action="rollback"))
        finally:
            producer.close()
        print(f"serving version {info.version} (was {previous}); announced on {topics.index_control}")
    else:
        print(f"serving version {info.version} (was {previous}); not announced (no Kafka configured)")
    return 0


def _unpin(args: argparse.Namespace) -> int:
    removed = ArtifactStore(args.root).unpin()
    print("unpinned: builders publish again" if removed else "nothing was pinned")
    return 0
