"""The ``towerstream`` console script: one entry point, one subcommand per job.

Each package contributes its subcommands through a ``register(subparsers)`` function
in a small ``_*_cli`` module; this module only collects them, parses, and turns
towerstream's own errors into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from streams.errors import TowerstreamError

__all__ = ["main", "build_parser"]

# Modules that expose ``register(subparsers)``; each adds one or more subcommands.
_COMMAND_MODULES: tuple[str, ...] = (
    "streams._broker_cli",
    "streams._produce_cli",
    "learners._learn_cli",
    "indexer._index_cli",
    "serving._serve_cli",
    "app._demo_cli",
    "app._train_cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="towerstream",
        description="Streaming online learning for two-tower recommendation.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except TowerstreamError as exc:
        print(f"towerstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"towerstream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
