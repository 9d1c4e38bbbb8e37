"""``towerstream train``: the offline protocol on the streaming learners.

``--dataset movielens`` trains each model on the training part of a MovieLens folder
(layouts ml-100k, ml-1m or the current CSV layout, detected from its files;
``--split random`` or ``time``; ``--protocol project`` or ``inttower-paper``), prints
each model's test AUC and logloss (mean ± sd over ``--seeds``) as soon as it finishes,
beside the IntTower paper's Table 2 (MovieLens-1M, its own protocol: a different data
set), and with ``--ablations`` the IntTower (-LightSE, -FE, -CIR) and DAT (-AMM, -CA)
ablation rows. Then, unless ``--no-retrieval``, the retrieval metrics of the frozen
item towers on a time split: Recall@K, HR@K and NDCG@K (K = 10, 50, 100) of the
two-tower (BCE and in-batch softmax) and IntTower against a popularity baseline, by
exact search and by the index the indexer would serve (and a forced IVF index, where
the ANN loss shows). Progress per model and epoch: a bar on a terminal, one line per
epoch otherwise.

``--dataset simulator`` runs each model prequentially (predict, then learn) on the
simulated click stream and prints its AUC, with the true model's AUC (the ceiling)
above it; ``--feature-strength`` sets how much of the latent factors the features
explain (lower: more collaborative signal that only the ids reveal).

Examples::

    towerstream train --dataset movielens --path ../shared/data/ml-100k --model all --ablations --seeds 0,1,2
    towerstream train --dataset movielens --path ../shared/data/ml-100k --protocol inttower-paper
    towerstream train --dataset simulator --events 200000 --model two-tower,inttower,lr,ctr
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence, TextIO

import numpy as np

from streams.errors import ConfigError

__all__ = ["register", "MODELS", "ROWS"]

#: Table rows of ``--model``: label -> (registered learner, parameter overrides).
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "ctr": ("ctr", {"half_life": 1e12}),  # the item's click average: no decay offline
    "lr": ("lr", {}),
    "two-tower": ("two-tower", {}),
    "two-tower-softmax": ("two-tower", {"loss": "softmax"}),
    "dat": ("dat", {"category_field": "i:genres"}),
    "inttower": ("inttower", {}),
}
MODELS = tuple(ROWS)
_SIM_MODELS = ("ctr", "lr", "two-tower", "inttower", "dat")
_TOWERS = ("two-tower", "inttower", "dat")
_KS = (10, 50, 100)


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``train`` subcommand to ``subparsers``."""
    p = subparsers.add_parser("train", help="offline protocol: AUC/logloss and retrieval metrics of every learner",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("movielens", "simulator"), default="movielens")
    p.add_argument("--path", default=None, help="MovieLens folder (ml-100k, ml-1m or CSV layout)")
    p.add_argument("--model", default="all",
                   help=f"comma-separated names among {', '.join(MODELS)} (simulator: {', '.join(_SIM_MODELS)}), "
                        "or 'all'")
    p.add_argument("--protocol", choices=("project", "inttower-paper"), default="project",
                   help="project: every rating, rating >= 4 a click, the learners' stream settings; "
                        "inttower-paper: the official IntTower code's (rating 3 dropped, > 3 a click, random split, "
                        "MLP 300-300-128, Adam 1e-3, batch 2048)")
    p.add_argument("--split", choices=("random", "time"), default=None, help="80/20 split of the ratings (random)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training part")
    p.add_argument("--batch-size", type=int, default=None, help="examples per update (1024; inttower-paper: 2048)")
    p.add_argument("--ablations", action="store_true",
                   help="also run IntTower -LightSE / -FE / -CIR and DAT -AMM / -CA")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the shuffles and the models")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (e.g. 0,1,2): mean ± sd per row")
    p.add_argument("--leaky-row", action="store_true",
                   help="also a two-tower row with the official code's per-split mean-rating features: they leak "
                        "the test labels, shown only to measure that effect")
    p.add_argument("--no-retrieval", action="store_true", help="movielens: skip the retrieval metrics")
    p.add_argument("--events", type=int, default=200_000, help="simulator: impressions to run prequentially")
    p.add_argument("--feature-strength", type=float, default=None,
                   help="simulator: share in [0, 1] of each user's and item's latent factor that its features "
                        "explain (0.8); lower leaves more collaborative signal that only the ids reveal")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for these small layers)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip (and count) malformed rating rows instead of refusing a damaged file")
    p.set_defaults(func=_run)


def _models(spec: str, allowed: Sequence[str]) -> list[str]:
    names = list(allowed) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ConfigError(f"--model {spec!r}: choose among {', '.join(allowed)} (comma-separated) or 'all'")
    return names


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise ConfigError("--seeds needs at least one integer, e.g. --seeds 0,1,2")
    return seeds


def _factory(name: str, seed: int, **overrides: Any) -> Callable[[], Any]:
    from learners.registry import make_learner

    if name in ("lr", "ctr"):
        return lambda: make_learner(name, **overrides)
    return lambda: make_learner(name, seed=seed, **overrides)


def _run(args: argparse.Namespace) -> int:
    if args.epochs < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ConfigError("--epochs and --batch-size must be >= 1")
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.dataset == "simulator":
        return _simulator(args)
    return _movielens(args)


def _simulator(args: argparse.Namespace) -> int:
    from learners.two_tower.offline import simulator_prequential, simulator_truth

    names = _models(args.model, _SIM_MODELS)
    batch = args.batch_size or 1024
    config: dict[str, float] = {}
    if args.feature_strength is not None:
        if not 0.0 <= args.feature_strength <= 1.0:
            raise ConfigError(f"--feature-strength must be in [0, 1], got {args.feature_strength}")
        config = {"user_feature_strength": args.feature_strength, "item_category_strength": args.feature_strength}
    for seed in _seeds(args):
        strength = f", feature strength {args.feature_strength}" if config else ""
        print(f"simulator stream, seed {seed}{strength}, first {args.events} impressions, prequential "
              f"(predict then learn), batch {batch}")
        print(f"{'model':<12} {'AUC':>7} {'logloss':>8} {'events/s':>9}")
        truth = simulator_truth(n_events=args.events, seed=seed, config=config)
        print(f"{'true model':<12} {truth['auc']:>7.4f} {truth['logloss']:>8.4f} {'':>9}  (the ceiling: the "
              "simulator's own click probabilities)")
        for name in names:
            s = simulator_prequential(_factory(name, seed), n_events=args.events, seed=seed, batch_size=batch,
                                      config=config)
            print(f"{name:<12} {s['auc']:>7.4f} {s['logloss']:>8.4f} {s['events_per_s']:>9.0f}")
            sys.stdout.flush()
    return 0


class _ProgressPrinter:
    """Renders :class:`~learners.two_tower.offline.Progress`: a bar redrawn in place on a
    terminal, one line per finished epoch otherwise."""

    def __init__(self, out: TextIO, label: str) -> None:
        self.out, self.label = out, label
        self.tty = bool(getattr(out, "isatty", lambda: False)())

    def __call__(self, p: Any) -> None:
        loss = "-" if p.loss is None else f"{p.loss:.4f}"
        head = f"  {self.label} epoch {p.epoch}/{p.epochs}"
        end = p.done >= p.total
        if self.tty:
            width = 24
            fill = int(width * p.done / max(p.total, 1))
            line = f"\r{head} [{'#' * fill}{'.' * (width - fill)}] {p.events_per_s:,.0f} ev/s loss {loss}"
            if end and p.val_auc is not None:
                line += f" val AUC {p.val_auc:.4f}"
            self.out.write(line + ("\n" if end else ""))
        elif end:
            val = "" if p.val_auc is None else f", val AUC {p.val_auc:.4f}, val logloss {p.val_logloss:.4f}"
            self.out.write(f"{head}: {p.events_per_s:,.0f} events/s, loss {loss}{val}\n")
        self.out.flush()


def _movielens(args: argparse.Namespace) -> int:
    from learners.two_tower.offline import (ABLATIONS, DAT_ABLATIONS, PAPER_NOTE, PROTOCOLS, format_header,
                                            format_row, movielens_examples, split_examples, summarize,
                                            train_and_evaluate, with_leaky_mean_ratings)

    if not args.path:
        raise ConfigError("--dataset movielens needs --path DIR (e.g. ../shared/data/ml-100k)")
    proto = PROTOCOLS[args.protocol]
    if proto.split is not None and args.split not in (None, proto.split):
        raise ConfigError(f"--protocol {proto.name} uses a {proto.split} split; leave --split out or use "
                          "--protocol project")
    split = proto.split or args.split or "random"
    batch = args.batch_size or proto.batch_size or 1024
    names = _models(args.model, MODELS)
    seeds = _seeds(args)
    print(f"reading {args.path} ...", flush=True)
    data = movielens_examples(args.path, skip_bad_rows=args.skip_bad_rows, protocol=args.protocol)
    print(f"data: {data.source}: layout {data.layout}: {data.n_users:,} users, {data.n_items:,} items, "
          f"{data.n_ratings:,} ratings; {len(data.xs):,} examples, {int(data.ys.sum()):,} positive "
          f"({data.ys.mean():.1%}); click rule: {data.rule}")
    if data.notes.get("skipped_malformed") is not None:
        n = data.notes
        print(f"WARNING: damaged file read leniently: {n['rows']} rows, skipped {n['skipped_malformed']} malformed, "
              f"{n['skipped_rating']} with a rating outside 1..5, {n['skipped_unknown_id']} with an unknown id; "
              f"{n['timestamp_outside_period']} kept rows have timestamps outside the data set's period"
              + (" (the time split is unreliable)" if split == "time" else ""))
    elif data.notes.get("skipped"):
        print(f"WARNING: damaged file read leniently: skipped {data.notes['skipped']} of {data.notes['rows']} rows")
    print(f"protocol {proto.name}; split: {split} 80/20 (seeds {','.join(map(str, seeds))}), 10% of the training "
          f"part held out for validation; {args.epochs} epoch(s), batch {batch}")
    rows: list[tuple[str, str, dict[str, Any]]] = []
    leaky = "two-tower LEAKY means"
    for name in names:
        learner, over = ROWS[name]
        rows.append((name, learner, over))
        if args.ablations and name == "dat":
            rows += [(label, "dat", over) for label, over in DAT_ABLATIONS.items() if label != "DAT (full)"]
        if args.ablations and name == "inttower":
            rows += [(f"IntTower {label}", "inttower", over) for label, over in ABLATIONS.items()
                     if label != "IntTower (full)"]
    if args.leaky_row:
        rows.append((leaky, "two-tower", {}))
    splits = {seed: split_examples(data, split, seed=seed) for seed in seeds}
    out = sys.stdout
    summaries = []
    print(format_header())
    for label, learner, over in rows:
        params = {**(proto.tower_params if learner in _TOWERS else {}), **over}
        results = []
        for seed in seeds:
            train, test = splits[seed]
            rows_data = with_leaky_mean_ratings(data, (train, test)) if label == leaky else data
            res, _ = train_and_evaluate(_factory(learner, seed, **params), rows_data, train, test, name=label,
                                        epochs=args.epochs, batch_size=batch, seed=seed, shuffle=split == "random",
                                        progress=_ProgressPrinter(out, f"{label} seed {seed}"))
            results.append(res)
        summaries.append(summarize(results))
        print(format_row(summaries[-1]))
        out.flush()
    print(f"\nsummary (test AUC / logloss, mean ± sd over seeds {','.join(map(str, seeds))}):")
    print(format_header())
    for s in summaries:
        print(format_row(s))
    print(PAPER_NOTE)
    if args.leaky_row:
        print(f"{leaky!r}: the two-tower with the official code's user and item mean ratings computed on each "
              "split, the test split included: they leak the test labels, so that row is not a result")
    if not args.no_retrieval:
        _retrieval(args, data, seeds, batch, proto)
    return 0


def _retrieval(args: argparse.Namespace, data: Any, seeds: list[int], batch: int, proto: Any) -> None:
    """Recall/HR/NDCG@K of the frozen item towers on a time split, exact and served."""
    from indexer.build import BuildConfig, build_index
    from learners.ranking_metrics import retrieval_metrics
    from learners.two_tower.offline import retrieval_task, split_examples, top_k, train_and_evaluate

    train, test = split_examples(data, "time")
    task = retrieval_task(data, train, test)
    kmax = max(_KS)
    n_pos = sum(len(r) for r in task.relevant)
    print(f"\nretrieval: time split (oldest 80% train, newest 20% test), {n_pos:,} held-out positives of "
          f"{len(task.relevant):,} users over {len(task.item_keys):,} items; items a user rated in the training "
          f"part are excluded from its ranking; mean over seeds {','.join(map(str, seeds))}")
    cols = [f"{m}@{k}" for m in ("recall", "hr", "ndcg") for k in _KS]
    print(f"{'model':<17} {'index':<40} " + " ".join(f"{c:>10}" for c in cols) + "   sd: recall@50 ndcg@10")
    n_items = len(task.item_keys)
    table: dict[tuple[str, str], list[dict[str, float]]] = {}
    labels: dict[tuple[str, str], list[Any]] = {}
    pop = np.broadcast_to(task.popularity, (len(task.user_xs), n_items))
    table[("popularity", "exact (training positives)")] = [retrieval_metrics(top_k(pop, task.seen, kmax), task.relevant,
                                                                              _KS)]
    _print_retrieval(("popularity", "exact (training positives)"), table, cols)
    for name in ("two-tower", "two-tower-softmax", "inttower"):
        if name not in _models(args.model, MODELS):
            continue
        learner_name, over = ROWS[name]
        for seed in seeds:
            _, learner = train_and_evaluate(_factory(learner_name, seed, **{**proto.tower_params, **over}), data,
                                            train, test, name=name, epochs=args.epochs, batch_size=batch, seed=seed,
                                            shuffle=False, progress=_ProgressPrinter(sys.stdout, f"{name} (time split) "
                                                                                       f"seed {seed}"))
            users = learner.encode_users(task.user_xs)
            items = learner.encode_items(task.item_xs)
            exact = top_k(users @ items.T, task.seen, kmax)
            table.setdefault((name, "exact (flat)"), []).append(retrieval_metrics(exact, task.relevant, _KS))
            for how, config in (("served", BuildConfig()), ("ivf", BuildConfig(kind="ivf_flat", seed=seed))):
                built = build_index(items, config, queries=users)
                labels.setdefault((name, how), []).append(built)
                extra = max(len(s) for s in task.seen) if task.seen else 0
                _, found = built.index.search(users, min(n_items, kmax + extra))
                ranked = [[int(j) for j in row if j >= 0 and j not in s][:kmax] for row, s in zip(found, task.seen)]
                table.setdefault((name, how), []).append(retrieval_metrics(ranked, task.relevant, _KS))
        for key in [k for k in table if k[0] == name]:
            _print_retrieval(key, table, cols, _index_label(key[1], labels[key]) if key in labels else None)


def _index_label(how: str, builds: list[Any]) -> str:
    """What was searched: the served index's kind, or the forced IVF with its tuned nprobe per seed."""
    kinds = sorted({b.kind for b in builds})
    nlist = sorted({b.params.get("nlist") for b in builds if b.params.get("nlist")})
    nprobe = [str(b.params["nprobe"]) for b in builds if "nprobe" in b.params]
    desc = ", ".join(([f"nlist {'/'.join(map(str, nlist))}"] if nlist else [])
                     + ([f"nprobe {'/'.join(nprobe)}"] if nprobe else []))
    head = "served" if how == "served" else "forced"
    return f"{head} {'/'.join(kinds)}" + (f" ({desc})" if desc else "")


def _print_retrieval(key: tuple[str, str], table: dict, cols: list[str], label: str | None = None) -> None:
    runs = table[key]
    means = {c: float(np.mean([r[c] for r in runs])) for c in cols}
    sd = [float(np.std([r[c] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for c in ("recall@50", "ndcg@10")]
    print(f"{key[0]:<17} {label or key[1]:<40} " + " ".join(f"{means[c]:>10.4f}" for c in cols)
          + f"   {sd[0]:>12.4f} {sd[1]:>7.4f}")
    sys.stdout.flush()
