"""``towerstream broker start|stop|status``: the local Kafka broker from the command line.

``start`` returns once the broker answers and prints its bootstrap address (the broker
keeps running in the background); ``--foreground`` keeps it attached until Ctrl-C or
SIGTERM. ``stop`` and ``status`` find the broker through the pid file in the data
directory, so they work from any process.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from streams.broker import BrokerAlreadyRunningError, BrokerConfig, LocalBroker, read_status, stop_broker

__all__ = ["register"]


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``broker`` subcommand (with ``start``, ``stop``, ``status``) to ``subparsers``."""
    broker = subparsers.add_parser("broker", help="run a local single-node Kafka broker (no Docker)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = broker.add_subparsers(dest="broker_action", metavar="ACTION")
    actions.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, default=None,
                       help="broker data directory (default: $TOWERSTREAM_BROKER_DATA_DIR or ~/.cache/towerstream/broker)")

    start = actions.add_parser("start", help="start the broker and wait until it answers")
    common(start)
    start.add_argument("--port", type=int, default=None, help="client port (default 9092; 0 = any free port)")
    start.add_argument("--controller-port", type=int, default=None, help="KRaft controller port (default 9093; 0 = any free port)")
    start.add_argument("--heap", default=None, help="JVM heap options (default '-Xms128m -Xmx512m')")
    start.add_argument("--timeout", type=float, default=None, dest="start_timeout_s", help="seconds to wait for readiness")
    start.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C or SIGTERM stops the broker")
    start.set_defaults(func=_start)

    stop = actions.add_parser("stop", help="stop the broker of a data directory")
    common(stop)
    stop.set_defaults(func=_stop)

    status = actions.add_parser("status", help="say whether the broker runs (exit status 0) or not (3)")
    common(status)
    status.set_defaults(func=_status)


def _config(args: argparse.Namespace) -> BrokerConfig:
    return BrokerConfig.from_env(
        data_dir=args.data_dir, port=getattr(args, "port", None),
        controller_port=getattr(args, "controller_port", None), heap=getattr(args, "heap", None),
        start_timeout_s=getattr(args, "start_timeout_s", None))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _start(args: argparse.Namespace) -> int:
    broker = LocalBroker(_config(args))
    try:
        bootstrap = broker.start()
    except BrokerAlreadyRunningError as exc:
        print(f"already running: {exc.status.bootstrap} (pid {exc.status.pid}, data {broker.data_dir})")
        return 0
    print(bootstrap, flush=True)
    print(f"Kafka broker ready on {bootstrap} (data {broker.data_dir}, log {broker.log_file})", file=sys.stderr)
    if not args.foreground:
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = broker.wait()
        print(f"broker exited with code {code}; see {broker.log_file}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        broker.stop()
        print("broker stopped", file=sys.stderr)
        return 0


def _stop(args: argparse.Namespace) -> int:
    config = _config(args)
    if stop_broker(config.data_dir, config.stop_timeout_s):
        print(f"stopped the broker of {config.data_dir}")
    else:
        print(f"no broker running for {config.data_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = read_status(_config(args).data_dir)
    if status.running:
        print(f"running: {status.bootstrap} (pid {status.pid}, data {status.data_dir})")
        return 0
    print(f"{status.state}: no broker running for {status.data_dir}")
    return 3
