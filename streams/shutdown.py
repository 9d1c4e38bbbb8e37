"""A deadline on graceful shutdown: a process that cannot finish stopping exits anyway.

A long-running consumer stops gracefully on SIGTERM (finish the batch, checkpoint, commit,
close). With the broker gone, the client's final commit or close can block for ever
(confluent-kafka's synchronous commit and close wait for a coordinator that never
answers), and a process that never exits outlives its launcher. :func:`exit_if_still_stopping`
arms a timer when the stop begins; if the process is still running when it fires, it logs
why and exits with status 3. That is safe wherever the durable state is written before the
final commit: a learner's checkpoint carries the offsets it reflects, and a scorer or indexer
re-reads its topics from the committed offsets (at-least-once, never a lost record).

>>> t = exit_if_still_stopping(60.0, "doctest")
>>> t.daemon, t.is_alive()
(True, True)
>>> t.cancel()
"""

from __future__ import annotations

import logging
import os
import threading

__all__ = ["exit_if_still_stopping", "STUCK_EXIT_STATUS", "STOP_DEADLINE_S"]

log = logging.getLogger(__name__)

#: Exit status of a process that gave up on a graceful stop.
STUCK_EXIT_STATUS = 3
#: Seconds the long-running commands (learn, serve, index run) give a graceful stop.
STOP_DEADLINE_S = 30.0


def _exit(what: str, after_s: float) -> None:
    log.error("%s: still stopping %.0f s after the stop began (is the broker gone?); exiting without the "
              "final commit", what, after_s)
    logging.shutdown()
    os._exit(STUCK_EXIT_STATUS)


def exit_if_still_stopping(after_s: float, what: str) -> threading.Timer:
    """Start (and return) a daemon timer that ends the process ``after_s`` seconds from now
    with status :data:`STUCK_EXIT_STATUS`; ``cancel()`` it if the stop completes and the
    process goes on."""
    if not after_s > 0:
        raise ValueError(f"after_s must be > 0, got {after_s}")
    timer = threading.Timer(after_s, _exit, args=(what, after_s))
    timer.daemon = True
    timer.start()
    return timer
