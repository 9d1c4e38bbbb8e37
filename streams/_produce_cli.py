"""``towerstream produce simulate|replay``: write a click stream to Kafka.

``simulate`` runs :class:`streams.simulator.ClickSimulator`; ``replay`` turns MovieLens
ratings into impressions and clicks (:func:`streams.replay.iter_movielens_events`).
Requests go to the requests topic, impressions and clicks to the events topic, every
record keyed by its user id. ``--rate`` paces the stream in wall-clock time (0: as fast
as the producer takes it); ``--events`` and ``--duration`` bound it (without either,
``simulate`` runs until Ctrl-C). A progress line goes to stderr and a count per event
kind to stdout at the end. ``replay --on-bad-line skip`` replays only the rating lines
that pass the checks (default ``raise``: a damaged file stops the replay, naming the
line) and prints the skipped lines per reason at the end.

Item events (:mod:`streams.items`) go to the items topic, keyed by item id: ``simulate``
announces every item that arrives mid-stream (an ``upsert`` with its features, stamped
with the wall-clock time it goes out) just before the first event that can show it, and
``replay`` announces each item before its first impression (in a replay every item is new
once). The scorer applies them to the served index within a poll
(``towerstream_item_freshness_seconds``); ``--no-item-events`` leaves them out.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from streams.errors import ConfigError
from streams.events import Event, encode_event
from streams.items import ItemEvent, encode_item_event, key_for_item
from streams.topics import DEFAULT_PARTITIONS, ITEMS_PARTITIONS, Topics, key_for_user

__all__ = ["register", "produce_events", "EventSink"]

ProgressFn = Callable[[Counter, float], None]


class EventSink(Protocol):
    """The part of a producer :func:`produce_events` uses (see :mod:`streams.transport`)."""

    def send(self, topic: str, value: bytes, key: bytes | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...


def produce_events(
    producer: EventSink,
    topics: Topics,
    events: Iterable[Event | ItemEvent],
    *,
    rate: float = 0.0,
    duration: float | None = None,
    counts: Counter | None = None,
    progress: ProgressFn | None = None,
    progress_every_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    requests_producer: EventSink | None = None,
) -> Counter:
    """Send ``events`` (requests to ``topics.requests``, item events to ``topics.items``,
    the rest to ``topics.events``).

    Parameters
    ----------
    rate
        Events per second of wall-clock time; 0 sends as fast as possible. Item events
        go out at once and do not count against the rate (counted as ``item``).
    duration
        Stop after this many seconds (the events iterator is left unfinished).
    counts
        Updated in place with the events sent per kind (so a caller interrupted by
        Ctrl-C still knows what went out); a new Counter when ``None``.
    progress
        Called with ``(counts, elapsed seconds)`` about every ``progress_every_s``.
    requests_producer
        Sends the requests instead of ``producer`` (e.g. one without a batching linger:
        a scorer's answer time starts at the request's timestamp); flushed too.

    Returns
    -------
    Counter
        Events sent per kind, after a final ``producer.flush()``.

    >>> class Sink:
    ...     def __init__(self): self.sent = []
    ...     def send(self, topic, value, key=None, headers=None): self.sent.append((topic, key))
    ...     def flush(self, timeout=None): pass
    >>> from streams.simulator import ClickSimulator, SimulatorConfig
    >>> sink = Sink()
    >>> sim = ClickSimulator(SimulatorConfig(n_users=20, n_items=30, slate_size=3))
    >>> produce_events(sink, Topics("demo"), sim.events(max_events=4))
    Counter({'impression': 3, 'request': 1})
    >>> sink.sent[0][0], sink.sent[1][0]
    ('demo.requests', 'demo.events')
    """
    if rate < 0:
        raise ConfigError(f"rate must be >= 0 events/s (0 = as fast as possible), got {rate}")
    if duration is not None and duration < 0:
        raise ConfigError(f"duration must be >= 0 seconds, got {duration}")
    counts = Counter() if counts is None else counts
    req_topic, ev_topic = topics.requests, topics.events
    req_sink = producer if requests_producer is None else requests_producer
    start = clock()
    next_report = start + progress_every_s
    n = 0
    for event in events:
        if isinstance(event, ItemEvent):
            producer.send(topics.items, encode_item_event(event), key=key_for_item(event.item_id))
            counts["item"] += 1
            continue
        now = clock()
        if rate > 0:
            due = n / rate  # seconds after the start when this event may go out
            if duration is not None and due >= duration:
                break
            if due - (now - start) > 0.002:
                sleep(due - (now - start))
                now = clock()
        if duration is not None and now - start >= duration:
            break
        if event.kind == "request":
            req_sink.send(req_topic, encode_event(event), key=key_for_user(event.user_id))
        else:
            producer.send(ev_topic, encode_event(event), key=key_for_user(event.user_id))
        counts[event.kind] += 1
        n += 1
        if progress is not None and now >= next_report:
            progress(counts, now - start)
            next_report = now + progress_every_s
    producer.flush()
    if req_sink is not producer:
        req_sink.flush()
    if progress is not None:
        progress(counts, clock() - start)
    return counts


# --------------------------------------------------------------------------- CLI


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``produce`` (with ``simulate`` and ``replay``) to ``subparsers``."""
    produce = subparsers.add_parser("produce", help="write a simulated or replayed click stream to Kafka",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = produce.add_subparsers(dest="produce_source", metavar="SOURCE")
    sources.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bootstrap-servers", default=None,
                       help="Kafka host:port[,...] (default: $KAFKA_BOOTSTRAP_SERVERS or localhost:9092)")
        p.add_argument("--topic-prefix", default="towerstream", help="topic name prefix (default: towerstream)")
        p.add_argument("--events", type=int, default=None, metavar="N", help="stop after N events")
        p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
        p.add_argument("--rate", type=float, default=0.0,
                       help="events per wall-clock second (default 0: as fast as possible)")
        p.add_argument("--no-create-topics", action="store_true",
                       help="do not create the requests and events topics when they are missing")
        p.add_argument("--quiet", action="store_true", help="no progress line")
        p.add_argument("--no-item-events", action="store_true",
                       help="send no item events (new items) to <prefix>.items")

    sim = sources.add_parser("simulate", help="the click simulator (planted ground truth, drift, new items)")
    common(sim)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--n-users", type=int, default=None, help="users (default 10000)")
    sim.add_argument("--n-items", type=int, default=None, help="initial catalogue size (default 5000)")
    sim.add_argument("--slate-size", type=int, default=None, help="items shown per request (default 10)")
    sim.add_argument("--drift-every", type=int, default=None,
                     help="drift every N events (default 100000; 0 = never)")
    sim.add_argument("--new-item-rate", type=float, default=None,
                     help="expected new items per event (default 0.0005)")
    sim.add_argument("--truth-file", type=Path, default=None, metavar="PATH",
                     help="write ground truth as JSON lines with wall-clock times: drift points and each "
                          "new item's first impression")
    sim.set_defaults(func=_simulate)

    rep = sources.add_parser("replay", help="MovieLens ratings (ml-100k, ml-1m or the ratings.csv layout) in timestamp order")
    common(rep)
    rep.add_argument("--path", type=Path, default=None,
                     help="folder holding the MovieLens files (with --download: where to put them)")
    rep.add_argument("--download", default=None, metavar="NAME", choices=("ml-100k", "ml-1m"),
                     help="download NAME from files.grouplens.org first (needs internet)")
    rep.add_argument("--on-bad-line", default="raise", choices=("raise", "skip"),
                     help="a rating line that fails a check: 'raise' stops with the file and line (default); "
                          "'skip' leaves it out, counts it per reason and replays the rest")
    rep.add_argument("--requests", action="store_true",
                     help="also send a request (k=10) before each user's first rating at a timestamp, "
                          "for a scorer to answer")
    rep.add_argument("--truth-file", type=Path, default=None, metavar="PATH",
                     help="write each item's first impression (JSON lines with the wall-clock time it goes "
                          "out): the demo's freshness ground truth")
    rep.set_defaults(func=_replay)


def _simulate(args: argparse.Namespace) -> int:
    from streams.simulator import ClickSimulator, SimulatorConfig

    _check(args)
    overrides: dict = {"seed": args.seed}
    for name in ("n_users", "n_items", "slate_size", "new_item_rate"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.drift_every is not None:
        overrides["drift_every"] = args.drift_every or None
    sim = ClickSimulator(SimulatorConfig(**overrides))
    events: Iterable[Event | ItemEvent] = sim.events(max_events=args.events)
    if not args.no_item_events:
        events = _with_arrivals(sim, events)
    if args.truth_file is None:
        return _run(args, events)
    with args.truth_file.open("w", buffering=1) as fh:
        return _run(args, _with_truth(sim, events, fh))


def _with_arrivals(sim, events: Iterable[Event]) -> Iterator[Event | ItemEvent]:
    """Pass ``events`` through, announcing each item that arrived mid-stream with an
    ``upsert`` item event (wall-clock time) before the first event generated after it."""
    announced = sim.n_items  # the initial catalogue: the indexer learns it from the stream
    for event in events:
        if sim.n_items > announced:
            for item_id in sim.item_ids()[announced:]:
                yield ItemEvent("upsert", item_id, time.time(), sim.item_features(item_id))
            announced = sim.n_items
        yield event


def _with_truth(sim, events: Iterable[Event | ItemEvent], fh) -> Iterator[Event | ItemEvent]:
    """Pass ``events`` through, writing drift points and new items' first impressions to
    ``fh`` as JSON lines stamped with the wall-clock time they go out."""
    import json

    drifts_written, items_written, n = 0, set(), -1
    for event in events:
        if isinstance(event, ItemEvent):
            yield event
            continue
        n += 1
        while drifts_written < len(sim.drift_points) and sim.drift_points[drifts_written].event_count <= n:
            d = sim.drift_points[drifts_written]
            fh.write(json.dumps({"type": "drift", "wall_time": time.time(), "event_index": d.event_count,
                                 "event_time": d.event_time}) + "\n")
            drifts_written += 1
        if event.kind == "impression" and event.item_id in sim.new_item_first_seen \
                and event.item_id not in items_written:
            items_written.add(event.item_id)
            fh.write(json.dumps({"type": "new_item", "item_id": event.item_id, "wall_time": time.time(),
                                 "event_time": event.event_time}) + "\n")
        yield event


def _replay(args: argparse.Namespace) -> int:
    from streams.replay import download_movielens, iter_movielens_events, load_movielens

    _check(args)
    path = args.path
    if args.download:
        dest = path if path is not None else Path.home() / ".cache" / "towerstream" / "movielens"
        path = download_movielens(args.download, dest)
    if path is None:
        raise ConfigError("replay needs --path DIR (an unzipped ml-100k, ml-1m or ratings.csv + movies.csv folder) "
                          "or --download NAME")
    ml = load_movielens(path, on_bad_line=args.on_bad_line)
    events = iter_movielens_events(ml, requests=args.requests)
    if args.events is not None:
        from itertools import islice

        events = islice(events, args.events)
    try:
        if args.truth_file is None:
            return _run(args, events if args.no_item_events else _first_impressions(events, None))
        with args.truth_file.open("w", buffering=1) as fh:
            return _run(args, _first_impressions(events, fh, item_events=not args.no_item_events))
    finally:
        if ml.skipped:
            _report_skipped(ml)


def _first_impressions(events: Iterable[Event], fh, *, item_events: bool = True) -> Iterator[Event | ItemEvent]:
    """Pass ``events`` through; before each item's first impression announce it (an
    ``upsert`` item event, when ``item_events``) and write a ``new_item`` line stamped with
    the wall-clock time to ``fh`` (if given): in a replay every item is new once."""
    import json

    seen: set[str] = set()
    for event in events:
        if event.kind == "impression" and event.item_id not in seen:
            seen.add(event.item_id)
            if item_events:
                yield ItemEvent("upsert", event.item_id, time.time(), dict(event.item_features))
            if fh is not None:
                fh.write(json.dumps({"type": "new_item", "item_id": event.item_id, "wall_time": time.time(),
                                     "event_time": event.event_time}) + "\n")
        yield event


def _report_skipped(ml) -> None:
    from streams.replay import MOVIELENS_FORMATS

    ratings = MOVIELENS_FORMATS[ml.name][0]
    print(f"skipped {ml.n_skipped} bad lines of {ratings} (--on-bad-line skip; {len(ml)} usable):")
    for reason, n in sorted(ml.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {reason}: {n}")


def _check(args: argparse.Namespace) -> None:
    if args.events is not None and args.events < 0:
        raise ConfigError(f"--events must be >= 0, got {args.events}")
    if args.duration is not None and args.duration < 0:
        raise ConfigError(f"--duration must be >= 0 seconds, got {args.duration}")
    if args.rate < 0:
        raise ConfigError(f"--rate must be >= 0 events/s (0 = as fast as possible), got {args.rate}")


def _run(args: argparse.Namespace, events: Iterable[Event]) -> int:
    from streams.transport import KafkaSettings, ensure_topics, make_producer

    settings = KafkaSettings.from_env(default_bootstrap="localhost:9092")
    if args.bootstrap_servers:
        settings = KafkaSettings(args.bootstrap_servers, settings.client, settings.options)
    topics = Topics(prefix=args.topic_prefix)
    if not args.no_create_topics:
        ensure_topics(settings, {topics.requests: DEFAULT_PARTITIONS, topics.events: DEFAULT_PARTITIONS,
                                 topics.items: ITEMS_PARTITIONS})
    producer = make_producer(settings)
    requests_producer = make_producer(settings, linger_ms=0)  # a request's answer time starts at its send
    counts: Counter = Counter()
    progress = None if args.quiet else _progress_line
    try:
        produce_events(producer, topics, events, rate=args.rate, duration=args.duration, counts=counts,
                       progress=progress, requests_producer=requests_producer)
    except KeyboardInterrupt:
        producer.flush(timeout=10)
        requests_producer.flush(timeout=10)
        _report(counts, topics, progress_shown=progress is not None, interrupted=True)
        raise
    finally:
        producer.close()
        requests_producer.close()
    _report(counts, topics, progress_shown=progress is not None)
    return 0


def _progress_line(counts: Counter, elapsed: float) -> None:
    n = sum(counts.values())
    sys.stderr.write(f"\r{n:,} events  {n / elapsed if elapsed > 0 else 0.0:,.0f} events/s   ")
    sys.stderr.flush()


def _report(counts: Counter, topics: Topics, *, progress_shown: bool, interrupted: bool = False) -> None:
    if progress_shown:
        sys.stderr.write("\n")
    head = "sent before the interrupt" if interrupted else "sent"
    print(f"{head} {sum(counts.values())} events "
          f"(requests -> {topics.requests}; impressions, clicks -> {topics.events}):")
    for kind in ("request", "impression", "click"):
        print(f"  {kind}: {counts.get(kind, 0)}")
    if counts.get("item"):
        print(f"  item events -> {topics.items}: {counts['item']}")
