"""``towerstream train``: the offline protocol on the streaming learners.

``--dataset movielens`` trains each ``--model`` on 80% of the ratings of a MovieLens
directory (``--split random`` or ``time``), prints test AUC and logloss, and with
``--ablations`` the IntTower ablation table (full, -LightSE, -FE, -CIR), next to what
the IntTower paper reports. ``--dataset simulator`` runs each model prequentially
(predict, then learn) on the simulated click stream and prints its AUC, with the
CTR-average baseline beside it.

Examples::

    towerstream train --dataset movielens --path ../shared/data/ml-100k --model all --ablations
    towerstream train --dataset simulator --events 200000 --model two-tower,inttower,lr,ctr
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from streams.errors import ConfigError

__all__ = ["register", "MODELS"]

MODELS = ("two-tower", "inttower", "dat", "lr")


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``train`` subcommand to ``subparsers``."""
    p = subparsers.add_parser("train", help="offline protocol: train and score two-tower / IntTower / DAT / LR",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("movielens", "simulator"), default="movielens")
    p.add_argument("--path", default=None, help="MovieLens directory (ml-100k or ml-1m layout)")
    p.add_argument("--model", default="all",
                   help=f"comma-separated names among {', '.join(MODELS)} (simulator: also ctr), or 'all'")
    p.add_argument("--split", choices=("random", "time"), default="random", help="80/20 split of the ratings")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training part")
    p.add_argument("--batch-size", type=int, default=1024, help="examples per update")
    p.add_argument("--ablations", action="store_true", help="also run IntTower full / -LightSE / -FE / -CIR")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the shuffles and the models")
    p.add_argument("--events", type=int, default=200_000, help="simulator: impressions to run prequentially")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for these small layers)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="ml-100k: skip (and count) malformed rating rows instead of refusing a damaged file")
    p.set_defaults(func=_run)



def _models(spec: str, allowed: tuple[str, ...]) -> list[str]:
    names = list(allowed) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ConfigError(f"--model {spec!r}: choose among {', '.join(allowed)} (comma-separated) or 'all'")
    return names


def _factory(name: str, seed: int, **overrides: Any) -> Callable[[], Any]:
    from learners.registry import make_learner

    if name in ("lr", "ctr"):
        return lambda: make_learner(name, **overrides)
    return lambda: make_learner(name, seed=seed, **overrides)


def _run(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be >= 1")
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.dataset == "simulator":
        return _simulator(args)
    return _movielens(args)


def _simulator(args: argparse.Namespace) -> int:
    from learners.two_tower.offline import simulator_prequential

    names = _models(args.model, (*MODELS, "ctr")) if args.model != "all" else [*MODELS, "ctr"]
    print(f"simulator stream, seed {args.seed}, first {args.events} impressions, prequential "
          f"(predict then learn), batch {args.batch_size}")
    print(f"{'model':<12} {'AUC':>7} {'logloss':>8} {'events/s':>9}")
    for name in names:
        s = simulator_prequential(_factory(name, args.seed), n_events=args.events, seed=args.seed,
                                  batch_size=args.batch_size)
        print(f"{name:<12} {s['auc']:>7.4f} {s['logloss']:>8.4f} {s['events_per_s']:>9.0f}")
        sys.stdout.flush()
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from learners.two_tower.offline import (ABLATIONS, PAPER_NOTE, format_results, movielens_examples,
                                            split_examples, train_and_evaluate)

    if not args.path:
        raise ConfigError("--dataset movielens needs --path DIR (e.g. ../shared/data/ml-100k)")
    names = _models(args.model, MODELS)
    data = movielens_examples(args.path, skip_bad_rows=args.skip_bad_rows)
    train, test = split_examples(data, args.split, seed=args.seed)
    pos = data.ys.mean()
    print(f"data: {data.source}: {len(data.xs)} ratings, {pos:.1%} positive (rating >= 4)")
    if data.notes.get("rows"):
        n = data.notes
        print(f"WARNING: damaged file read leniently: {n['rows']} rows, skipped {n['skipped_malformed']} malformed, "
              f"{n['skipped_rating']} with a rating outside 1..5, {n['skipped_unknown_id']} with an unknown id; "
              f"{n['timestamp_outside_period']} kept rows have timestamps outside the data set's period"
              + (" (the time split is unreliable)" if args.split == "time" else ""))
    print(f"split: {args.split} 80/20 (seed {args.seed}): {len(train)} train, {len(test)} test; "
          f"{args.epochs} epoch(s), batch {args.batch_size}")
    shuffle = args.split == "random"
    results = []
    for name in names:
        results.append(train_and_evaluate(_factory(name, args.seed), data, train, test, name=name, epochs=args.epochs,
                                          batch_size=args.batch_size, seed=args.seed, shuffle=shuffle))
        print(format_results(results[-1:]).splitlines()[1] if results[1:] else format_results(results[-1:]))
        sys.stdout.flush()
    if args.ablations:
        print("\nIntTower ablations (same split, epochs, batch):")
        rows = [train_and_evaluate(_factory("inttower", args.seed, **over), data, train, test, name=label,
                                   epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, shuffle=shuffle)
                for label, over in ABLATIONS.items()]
        print(format_results(rows))
    print("\n" + PAPER_NOTE)
    return 0
