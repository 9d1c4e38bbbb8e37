"""How much of the simulator's click signal is learnable: the true model's AUC beside the learners'.

Not a throughput benchmark (the runner skips it: it is not ``bench_*``). It prints, on the first
``--impressions`` impressions of the simulator stream with ``--seed``:

* the AUC of the true click probability (the simulator's own model, position included): the
  ceiling no learner can pass;
* the prequential AUC of each ``--learners`` (predict each batch, then learn it), cumulative and
  per chunk of ``--chunk`` impressions: where a learner's rolling AUC flattens is what it can
  learn from this stream.

On seed 1 (167k impressions, batch 1024): truth 0.832, while LR, two-tower and IntTower all
flatten at ~0.79 per 20k chunk within ~40k impressions and stay there: the gap is per-user and
per-item signal too thin in this stream to learn, whatever the model.

    PYTHONPATH=. .venv/bin/python benchmarks/sim_ceiling.py --seed 1
    PYTHONPATH=. .venv/bin/python benchmarks/sim_ceiling.py --seed 1 --users 2000 --items 1000
"""

from __future__ import annotations

import argparse
import time
from typing import Iterator

import numpy as np
import torch

from learners.evaluate import prequential_step, xy_from_events
from learners.metrics import roc_auc
from learners.registry import make_learner
from streams.events import Event
from streams.simulator import ClickSimulator, SimulatorConfig


class _NoMetrics:
    def update(self, y_true: object, p: object) -> None:
        pass


def stream_with_truth(config: SimulatorConfig, n: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The first ``n`` impressions as learner examples, their labels and their true click
    probabilities (read as each event is generated: the world drifts)."""
    sim = ClickSimulator(config)
    truth: list[float] = []

    def tapped() -> Iterator[Event]:
        for e in sim.events():
            if e.kind == "impression":
                truth.append(sim.true_click_probability(e.user_id, e.item_id, e.position))
            yield e

    xs: list[dict] = []
    ys: list[int] = []
    for x, y in xy_from_events(tapped()):
        xs.append(x)
        ys.append(y)
        if len(xs) >= n:
            break
    return xs, np.asarray(ys, dtype=np.float64), np.asarray(truth[: len(xs)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--impressions", type=int, default=167_000)
    ap.add_argument("--users", type=int, default=SimulatorConfig.n_users)
    ap.add_argument("--items", type=int, default=SimulatorConfig.n_items)
    ap.add_argument("--learners", default="lr,two-tower,inttower")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=20_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = SimulatorConfig(seed=args.seed, n_users=args.users, n_items=args.items)
    xs, ys, truth = stream_with_truth(config, args.impressions)
    print(f"simulator seed {args.seed}, {args.users} users, {args.items} items, {len(xs)} impressions, "
          f"CTR {ys.mean():.3f}, batch {args.batch}, chunks of {args.chunk}")
    chunks = range(0, len(xs), args.chunk)
    print(f"{'true click model':<18} AUC {roc_auc(ys, truth):.4f}  per chunk "
          + " ".join(f"{roc_auc(ys[i:i + args.chunk], truth[i:i + args.chunk]):.3f}" for i in chunks))
    for name in [n for n in args.learners.split(",") if n]:
        seeded = name in ("two-tower", "inttower", "dat")  # as `towerstream train` seeds them
        learner = make_learner(name, seed=args.seed) if seeded else make_learner(name)
        p = np.empty(len(xs))
        t0 = time.process_time()
        for lo in range(0, len(xs), args.batch):
            p[lo:lo + args.batch] = prequential_step(learner, xs[lo:lo + args.batch], ys[lo:lo + args.batch],
                                                     _NoMetrics())
        cpu = time.process_time() - t0
        print(f"{name:<18} AUC {roc_auc(ys, p):.4f}  per chunk "
              + " ".join(f"{roc_auc(ys[i:i + args.chunk], p[i:i + args.chunk]):.3f}" for i in chunks)
              + f"  ({cpu:.1f} CPU s)")


if __name__ == "__main__":
    main()
