"""A learner process for crash tests: one :class:`StreamLearnerRuntime`, stats on exit.

    python tests/test_learners/_learner_proc.py --bootstrap H:P --group G --prefix P \
        --checkpoint model.ckpt --learner ctr [--params '{"half_life": 50}']
        [--batch-size 1] [--checkpoint-every-n 50] [--slow-ms 2] [--idle-timeout 1.5]

``--learner test-counter`` is :class:`CountingLearner`, an exact, order-independent
counter (registered in this process only). SIGTERM/SIGINT stop it gracefully. The last stdout line is a
JSON summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np
import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from learners.registry import make_learner, register  # noqa: E402
from learners.runtime import StreamLearnerRuntime  # noqa: E402
from streams.topics import Topics  # noqa: E402
from streams.transport import KafkaSettings  # noqa: E402


class CountingLearner:
    """Counts impressions and clicks per item, exactly: its state does not depend on the
    order or the batching of the events, so two runs over the same events compare equal
    only if each event was learned exactly once."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.n_learned = 0

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "test-counter", "params": {}}

    def predict_proba_many(self, xs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return np.array([(c[1] + 1) / (c[0] + 2) for c in (self.counts.get(str(x["item_id"]), [0, 0])
                                                          for x in xs)], dtype=np.float64)

    def predict_proba_one(self, x: Mapping[str, Any]) -> float:
        return float(self.predict_proba_many([x])[0])

    def learn_many(self, xs: Sequence[Mapping[str, Any]], ys: Sequence[int] | np.ndarray) -> None:
        for x, y in zip(xs, ys):
            c = self.counts.setdefault(str(x["item_id"]), [0, 0])
            c[0] += 1
            c[1] += int(y)
        self.n_learned += len(xs)

    def learn_one(self, x: Mapping[str, Any], y: int) -> None:
        self.learn_many([x], [y])

    def state_dict(self) -> dict[str, Any]:
        return {"counts": {k: list(v) for k, v in self.counts.items()}, "n_learned": self.n_learned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = {k: list(v) for k, v in state["counts"].items()}
        self.n_learned = int(state["n_learned"])



class _Slow:
    """Delegates to a learner, sleeping after each batch it learns (to kill mid-stream)."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self._inner, self._seconds = inner, seconds

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in ("learn_many", "predict_learn_many"):
            def slowed(*args: Any, **kwargs: Any) -> Any:
                out = attr(*args, **kwargs)
                time.sleep(self._seconds)
                return out
            return slowed
        return attr


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--client", default="kafka-python")
    ap.add_argument("--group", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--learner", default="ctr")
    ap.add_argument("--params", default="{}")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--checkpoint-every-n", type=int, default=None)
    ap.add_argument("--checkpoint-every-s", type=float, default=None)
    ap.add_argument("--slow-ms", type=float, default=0.0)
    ap.add_argument("--idle-timeout", type=float, default=None)
    ap.add_argument("--session-timeout-ms", type=int, default=6000)
    args = ap.parse_args()

    # Registered here, in the child process only: importing this module has no side effect.
    register("test-counter", CountingLearner, replace=True)
    learner = make_learner(args.learner, **orjson.loads(args.params))
    if args.slow_ms:
        learner = _Slow(learner, args.slow_ms / 1000)
    settings = KafkaSettings(args.bootstrap, args.client,
                             {"session_timeout_ms": args.session_timeout_ms, "heartbeat_interval_ms": 1000})
    from learners.metrics import PrequentialMetrics

    runtime = StreamLearnerRuntime(
        settings, learner, args.group, Topics(args.prefix), args.checkpoint,
        metrics=PrequentialMetrics(auc_bins=4096),  # small histograms: batches of one event stay cheap
        checkpoint_every_n=args.checkpoint_every_n, checkpoint_every_s=args.checkpoint_every_s,
        batch_size=args.batch_size, poll_timeout_s=0.2, idle_timeout_s=args.idle_timeout,
    )
    runtime.install_signal_handlers()
    stats = runtime.run()
    print(orjson.dumps({
        "events_learned": stats.events_learned, "events_learned_run": stats.events_learned_run,
        "records": stats.records, "skipped": stats.skipped, "dead_lettered": stats.dead_lettered,
        "duplicates": stats.duplicates, "checkpoints": stats.checkpoints,
        "resumed_from": None if runtime.resumed_from is None else runtime.resumed_from.events_learned,
    }).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
