"""A consumer process for crash tests: records every handled event id to a file.

    python tests/test_streams/_consumer_proc.py --bootstrap H:P --group G --topic T \
        --dead-letter-topic D --out ids.txt [--client confluent] [--batch-size 50]
        [--slow-ms 20] [--idle-timeout 3]

Each batch's event ids are appended to ``--out`` and fsync'ed *before* the batch is
committed, so after a crash the file holds everything that was handled (at least once).
The last line of stdout is a JSON summary. Exits 0 after ``--idle-timeout`` seconds
without records.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from streams.consumer import EventBatch, open_event_consumer  # noqa: E402
from streams.transport import KafkaSettings  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--client", default="kafka-python")
    ap.add_argument("--group", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--dead-letter-topic", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--slow-ms", type=float, default=0.0)
    ap.add_argument("--idle-timeout", type=float, default=3.0)
    ap.add_argument("--session-timeout-ms", type=int, default=6000,
                    help="short, so a restart does not wait 45 s for the killed member's session")
    args = ap.parse_args()

    options = {"session_timeout_ms": args.session_timeout_ms, "heartbeat_interval_ms": 1000}
    ec = open_event_consumer(KafkaSettings(args.bootstrap, args.client, options), args.group, [args.topic],
                             args.dead_letter_topic, batch_size=args.batch_size, poll_timeout_s=0.2)
    with open(args.out, "ab") as out:

        def handle(batch: EventBatch) -> None:
            out.write(b"".join(e.event_id.encode() + b"\n" for e in batch.events))
            out.flush()
            os.fsync(out.fileno())
            if args.slow_ms:
                time.sleep(args.slow_ms / 1000)

        try:
            counts = ec.run(handle, idle_timeout_s=args.idle_timeout)
        finally:
            ec.close()
    print(orjson.dumps({"events": counts.events, "dead_lettered": counts.dead_lettered,
                        "duplicates": counts.duplicates, "commits": counts.commits}).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
