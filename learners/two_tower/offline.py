"""The papers' offline protocol on the streaming code: MovieLens, splits, AUC/logloss, ablations.

Two protocols (:data:`PROTOCOLS`):

``project`` (default)
    Every rating is an example, ``rating >= 4`` is a click (positive), anything lower a
    non-click (half stars of the CSV layout included: 3.5 is a non-click); 80/20 split,
    *random* (seeded) or by *time* (the oldest 80% train, the newest 20% test); the
    learners keep their streaming settings.
``inttower-paper``
    What the official IntTower code (``archersama/IntTower``,
    ``train_movielens_IntTower.py``) does, as far as it can be followed here: rating 3
    dropped, ``rating > 3`` positive, random 80/20 split, field embeddings of 32, tower
    MLPs 300-300-128, Adam 1e-3 on the dense layers, batch 2048. Departures: the id
    embeddings keep the learners' sparse Adagrad (the stream's optimiser) instead of
    Adam; the towers' outputs stay L2-normalised with a learned scale; the epoch count
    is the caller's (not taken from the official code); and its per-split
    mean-rating features are **not** used: they are computed from the labels of each
    split, the test split included, so they leak the test labels into the features.

In both, 10% of the training part (the newest 10% under a time split) is held out as a
validation split: the per-epoch progress reports its AUC, and anything tuned is tuned
on it, never on the test part. The learner trains ``epochs`` passes over the rest in
mini-batches - the same ``learn_many`` the stream uses - and the test part is scored
once: ROC AUC and logloss.

MovieLens is read by :mod:`streams.replay` (features identical to the replayed stream;
layouts ml-100k, ml-1m and the CSV layout). That reader refuses damaged files;
``skip_bad_rows=True`` reads them leniently instead (ml-100k: a rating row that is not
four integers, has a rating outside 1..5 or an unknown user/item is skipped and
counted, and timestamps outside the data set's documented period are counted; other
layouts: the reader's ``on_bad_line="skip"``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from learners.base import event_to_x
from learners.metrics import log_loss, roc_auc
from streams.errors import ConfigError

__all__ = [
    "Examples",
    "Progress",
    "Protocol",
    "Result",
    "RetrievalTask",
    "Split",
    "Summary",
    "movielens_examples",
    "split_examples",
    "with_leaky_mean_ratings",
    "train_and_evaluate",
    "summarize",
    "retrieval_task",
    "top_k",
    "simulator_prequential",
    "simulator_truth",
    "format_results",
    "ABLATIONS",
    "DAT_ABLATIONS",
    "PAPER_TABLE2",
    "PAPER_NOTE",
    "PROTOCOLS",
]

logger = logging.getLogger(__name__)

Split = Literal["random", "time"]

#: IntTower ablations (paper Table 4): parameter overrides of the ``inttower`` learner.
ABLATIONS: dict[str, dict[str, Any]] = {
    "IntTower (full)": {},
    "-LightSE": {"lightse": False},
    "-FE": {"fe": False},
    "-CIR": {"cir": False},
}

#: The field DAT's category alignment reads on MovieLens (its first genre).
DAT_CATEGORY = "i:genres"

#: DAT ablations: overrides of the ``dat`` learner (full DAT: adaptive mimic plus
#: category alignment on the first genre).
DAT_ABLATIONS: dict[str, dict[str, Any]] = {
    "DAT (full)": {"category_field": DAT_CATEGORY},
    "DAT -AMM": {"category_field": DAT_CATEGORY, "mimic_weight": 0.0},
    "DAT -CA": {"category_field": None},
}

#: IntTower paper (Li et al., CIKM'22) Table 2, MovieLens-1M: model -> (AUC, logloss).
PAPER_TABLE2: dict[str, tuple[float, float]] = {
    "two-tower": (0.8697, 0.4559),
    "dat": (0.8712, 0.4556),
    "cold": (0.8836, 0.3297),
    "inttower": (0.8974, 0.3128),
}

PAPER_NOTE = (
    "paper = IntTower paper (Li et al., CIKM'22) Table 2, on MovieLens-1M with its own protocol (rating 3 "
    "dropped, per-split mean-rating features that include the test labels): a different data set, not "
    "comparable cell by cell. COLD (not run here): paper AUC 0.8836, logloss 0.3297."
)

# ml-100k's README: ratings collected 19 Sep 1997 - 22 Apr 1998 (UTC epoch seconds).
_ML100K_PERIOD = (874_724_710, 893_286_638)


@dataclass(frozen=True)
class Protocol:
    """An offline protocol: the label rule, a forced split and batch, and learner settings.

    Attributes
    ----------
    name
        Its name on the command line.
    rule
        The click rule, in words.
    drop
        Ratings removed before anything else.
    positive_above
        ``rating > positive_above`` is a click.
    split, batch_size
        Forced split and batch size (``None``: the caller's).
    tower_params
        Overrides of the two-tower family's learners.
    """

    name: str
    rule: str
    drop: tuple[float, ...]
    positive_above: float
    split: Split | None = None
    batch_size: int | None = None
    tower_params: Mapping[str, Any] = field(default_factory=dict)


PROTOCOLS: dict[str, Protocol] = {
    "project": Protocol("project", "rating >= 4 is a click, every rating kept", (), 3.75),
    "inttower-paper": Protocol("inttower-paper", "rating > 3 is a click, rating 3 dropped", (3.0,), 3.0,
                               split="random", batch_size=2048,
                               tower_params={"field_dim": 32, "hidden": (300, 300), "out_dim": 128,
                                             "lr_dense": 1e-3}),
}


@dataclass(frozen=True)
class Examples:
    """Examples ``xs`` (learner dicts), labels ``ys`` (N,), times ``times`` (N,) seconds,
    where they came from, and what was skipped or doubtful on the way.

    ``layout`` is the MovieLens layout detected, ``rule`` the click rule applied,
    ``n_users``/``n_items``/``n_ratings`` the counts in the loaded data (``n_ratings``
    before a protocol drops any).
    """

    xs: list[dict[str, Any]]
    ys: np.ndarray
    times: np.ndarray
    source: str
    notes: dict[str, int] = field(default_factory=dict)
    layout: str = ""
    rule: str = ""
    n_users: int = 0
    n_items: int = 0
    n_ratings: int = 0
    ratings: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Progress:
    """Where a training run is: model, epoch (1-based), examples done of the epoch,
    examples/s so far, mean training loss of the epoch so far (``None`` when the learner
    reports none), and at the end of an epoch the validation AUC and logloss."""

    model: str
    epoch: int
    epochs: int
    done: int
    total: int
    events_per_s: float
    loss: float | None
    val_auc: float | None = None
    val_logloss: float | None = None


@dataclass(frozen=True)
class Result:
    """Test AUC and logloss of one trained model, with sizes, training time and the
    validation AUC after each epoch (the learning curve)."""

    model: str
    auc: float
    logloss: float
    n_train: int
    n_test: int
    train_seconds: float
    val_auc: tuple[float, ...] = ()


def _lenient_ml100k(path: Path) -> tuple[Any, dict[str, int]]:
    """An ml-100k :class:`streams.replay.MovieLens` that skips (and counts) bad rows."""
    from streams.replay import MovieLens, age_bucket, year_bucket

    def rows(name: str, sep: str) -> list[list[str]]:
        text = (path / name).read_text(encoding="latin-1")
        return [line.split(sep) for line in text.splitlines() if line]

    users = {}
    for r in rows("u.user", "|"):
        if len(r) == 5 and r[0].isdigit() and r[1].isdigit():
            z = r[4].strip().upper()
            users[int(r[0])] = {"age": age_bucket(int(r[1])), "gender": r[2], "occupation": r[3],
                                "zip_prefix": z[:1] if z else "unknown"}
    genres = [r[0] for r in rows("u.genre", "|")] if (path / "u.genre").is_file() else []
    items, titles = {}, {}
    for r in rows("u.item", "|"):
        if len(r) == 5 + len(genres) and r[0].isdigit():
            date = r[2].strip()
            year = int(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else None
            items[int(r[0])] = {"genres": tuple(g for g, f in zip(genres, r[5:]) if f.strip() == "1") or ("unknown",),
                                "year_bucket": year_bucket(year)}
            titles[int(r[0])] = r[1]
    notes = {"rows": 0, "skipped_malformed": 0, "skipped_rating": 0, "skipped_unknown_id": 0}
    kept: list[tuple[int, int, int, int]] = []
    for r in rows("u.data", "\t"):
        notes["rows"] += 1
        if len(r) != 4 or not all(f.strip().isdigit() for f in r):
            notes["skipped_malformed"] += 1
            continue
        u, i, rating, ts = (int(f) for f in r)
        if not 1 <= rating <= 5:
            notes["skipped_rating"] += 1
        elif u not in users or i not in items:
            notes["skipped_unknown_id"] += 1
        else:
            kept.append((u, i, rating, ts))
    if not kept:
        raise ConfigError(f"{path / 'u.data'} holds no usable rating row")
    table = np.array(kept, dtype=np.int64)
    lo, hi = _ML100K_PERIOD
    notes["timestamp_outside_period"] = int(((table[:, 3] < lo) | (table[:, 3] > hi)).sum())
    ml = MovieLens("ml-100k", path, table[:, 0], table[:, 1], table[:, 2], table[:, 3], users, items, titles)
    return ml, notes


def _lenient(p: Path, layout: str) -> tuple[Any, dict[str, int]]:
    """The data in ``p`` read leniently (``--skip-bad-rows``)."""
    from streams.replay import load_movielens

    if layout == "ml-100k":
        return _lenient_ml100k(p)
    ml = load_movielens(p, on_bad_line="skip")
    return ml, {"rows": len(ml) + ml.n_skipped, "skipped": ml.n_skipped}


def movielens_examples(path: str | Path, *, skip_bad_rows: bool = False, protocol: str = "project") -> Examples:
    """The ratings of the MovieLens data in ``path`` as examples, under ``protocol``.

    A folder in no known layout raises the reader's error (each layout and its files).
    A damaged file raises :class:`ConfigError`; the error suggests ``--skip-bad-rows``
    only when a lenient read of the same folder succeeds.
    """
    from streams.replay import detect_movielens_format, iter_movielens_events, load_movielens

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[protocol]
    p = Path(path)
    layout = detect_movielens_format(p)
    try:
        ml, notes = load_movielens(p), {}
    except ConfigError as exc:
        if skip_bad_rows:
            ml, notes = _lenient(p, layout)
            logger.warning("read %s leniently: %s", p, notes)
        else:
            try:
                _lenient(p, layout)
            except ConfigError:
                raise exc from None  # skipping rows would not help: no advice
            raise ConfigError(f"{exc} (or pass --skip-bad-rows to train on the rows that parse)") from None
    order = np.argsort(ml.timestamps, kind="stable")  # the order iter_movielens_events yields
    ratings = np.asarray(ml.ratings, dtype=np.float64)[order]
    keep = ~np.isin(ratings, proto.drop)
    xs, times, k = [], [], 0
    for e in iter_movielens_events(ml):
        if e.kind == "impression":
            if keep[k]:
                xs.append(event_to_x(e, with_position=False))
                times.append(e.event_time)
            k += 1
    ys = (ratings[keep] > proto.positive_above).astype(np.float64)
    notes["examples"] = len(xs)
    return Examples(xs, ys, np.array(times), f"{layout} at {p}", notes, layout=layout, rule=proto.rule,
                    n_users=len(np.unique(ml.user_ids)), n_items=len(np.unique(ml.item_ids)), n_ratings=len(ml),
                    ratings=ratings[keep])


def with_leaky_mean_ratings(data: Examples, parts: Sequence[np.ndarray]) -> Examples:
    """``data`` with the official IntTower code's mean-rating features, for showing their
    effect only: each example gets its user's and its item's mean rating computed over
    the examples of its own part (train and test separately, as that code does), as
    half-star buckets ``u:mean_rating`` / ``i:mean_rating``. The test part's means are
    computed from the test labels' ratings: **this leaks the labels** into the features.
    """
    if data.ratings is None:
        raise ValueError("these examples carry no ratings (build them with movielens_examples)")
    xs = [dict(x) for x in data.xs]
    r = data.ratings
    for idx in parts:
        for key, name in (("user_id", "u:mean_rating"), ("item_id", "i:mean_rating")):
            sums: dict[Any, list[float]] = {}
            for i in idx.tolist():
                acc = sums.setdefault(xs[i][key], [0.0, 0.0])
                acc[0] += r[i]
                acc[1] += 1.0
            for i in idx.tolist():
                total, count = sums[xs[i][key]]
                xs[i][name] = f"{round(2 * total / count) / 2:.1f}"
    return Examples(xs, data.ys, data.times, data.source, dict(data.notes), layout=data.layout, rule=data.rule,
                    n_users=data.n_users, n_items=data.n_items, n_ratings=data.n_ratings, ratings=data.ratings)


def split_examples(data: Examples, how: Split, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices: a seeded random permutation, or oldest/newest by time."""
    n = len(data.xs)
    n_test = int(round(n * test_fraction))
    if how == "random":
        order = np.random.default_rng(seed).permutation(n)
    elif how == "time":
        order = np.argsort(data.times, kind="stable")
    else:
        raise ConfigError(f"split must be 'random' or 'time', got {how!r}")
    return order[: n - n_test], order[n - n_test:]


def _predict(learner: Any, xs: list[dict[str, Any]], idx: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(learner.predict_proba_many([xs[i] for i in idx[lo: lo + 4096]]),
                                      dtype=np.float64) for lo in range(0, len(idx), 4096)])


def _batch_loss(learner: Any) -> float | None:
    parts = getattr(learner, "last_loss", None)
    return float(sum(parts.values())) if parts else None


def train_and_evaluate(
    make: Callable[[], Any],
    data: Examples,
    train: np.ndarray,
    test: np.ndarray,
    *,
    name: str,
    epochs: int = 1,
    batch_size: int = 1024,
    seed: int = 0,
    shuffle: bool = True,
    valid_fraction: float = 0.1,
    progress: Callable[[Progress], None] | None = None,
    progress_every: int = 20,
) -> tuple[Result, Any]:
    """Train a fresh learner ``make()`` and score ``test``; returns the result and the learner.

    The last ``valid_fraction`` of ``train`` (in the order given: random for a random
    split, the newest for a time split) is the validation split; the learner trains
    ``epochs`` passes over the rest (reshuffled each epoch when ``shuffle``, in the
    given order otherwise). ``progress`` gets a :class:`Progress` every
    ``progress_every`` batches and at the end of each epoch (with the validation AUC).
    """
    learner = make()
    xs, ys = data.xs, data.ys
    n_val = int(round(len(train) * valid_fraction)) if len(train) > 10 else 0
    fit, val = (train[: len(train) - n_val], train[len(train) - n_val:]) if n_val else (train, train[:0])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    curve = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(fit) if shuffle else fit
        te, losses_, done = time.perf_counter(), [], 0
        for b, lo in enumerate(range(0, len(order), batch_size), 1):
            idx = order[lo: lo + batch_size]
            learner.learn_many([xs[i] for i in idx], ys[idx])
            done += len(idx)
            loss = _batch_loss(learner)
            if loss is not None:
                losses_.append(loss)
            if progress is not None and b % progress_every == 0 and done < len(order):
                progress(Progress(name, epoch, epochs, done, len(order), done / max(time.perf_counter() - te, 1e-9),
                                  float(np.mean(losses_)) if losses_ else None))
        rate = done / max(time.perf_counter() - te, 1e-9)
        v_auc = v_ll = None
        if len(val):
            pv = _predict(learner, xs, val)
            v_auc, v_ll = roc_auc(ys[val], pv), log_loss(ys[val], pv)
            curve.append(v_auc)
        if progress is not None:
            progress(Progress(name, epoch, epochs, done, len(order), rate, float(np.mean(losses_)) if losses_ else None,
                              v_auc, v_ll))
    seconds = time.perf_counter() - t0
    p = _predict(learner, xs, test)
    y = ys[test]
    return Result(name, roc_auc(y, p), log_loss(y, p), len(fit), len(test), seconds, tuple(curve)), learner


@dataclass(frozen=True)
class Summary:
    """One row of the table: a model's test AUC and logloss over seeds (mean and sample
    standard deviation, 0 for one seed), and its mean validation AUC per epoch."""

    model: str
    auc: float
    auc_sd: float
    logloss: float
    logloss_sd: float
    seeds: int
    n_train: int
    n_test: int
    train_seconds: float
    val_auc: tuple[float, ...] = ()


def summarize(results: Sequence[Result]) -> Summary:
    """The :class:`Summary` of one model's results over several seeds."""
    if not results:
        raise ValueError("summarize needs at least one result")
    auc = np.array([r.auc for r in results])
    ll = np.array([r.logloss for r in results])
    sd = (lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0)
    curves = [r.val_auc for r in results if r.val_auc]
    curve = tuple(float(v) for v in np.mean(curves, axis=0)) if curves and len({len(c) for c in curves}) == 1 else ()
    return Summary(results[0].model, float(auc.mean()), sd(auc), float(ll.mean()), sd(ll), len(results),
                   results[0].n_train, results[0].n_test, float(np.mean([r.train_seconds for r in results])), curve)


def _paper_key(model: str) -> str | None:
    m = model.lower()
    if m in ("two-tower", "two-tower (bce)"):
        return "two-tower"
    if m in ("dat", "dat (full)"):
        return "dat"
    if m in ("inttower", "inttower (full)"):
        return "inttower"
    return None


def format_header() -> str:
    """The header line of :func:`format_row`."""
    return (f"{'model':<22} {'AUC':>16} {'logloss':>16} {'paper AUC':>9} {'paper LL':>8} {'train':>7} "
            f"{'test':>6} {'train s':>7}  val AUC by epoch")


def format_row(s: Summary) -> str:
    """One table line: measured mean ± sd, the paper's figures where it has the model."""
    paper = PAPER_TABLE2.get(_paper_key(s.model) or "")
    pa, pl = (f"{paper[0]:.4f}", f"{paper[1]:.4f}") if paper else ("", "")
    curve = " ".join(f"{v:.4f}" for v in s.val_auc)
    return (f"{s.model:<22} {s.auc:>7.4f} ± {s.auc_sd:.4f} {s.logloss:>7.4f} ± {s.logloss_sd:.4f} {pa:>9} {pl:>8} "
            f"{s.n_train:>7} {s.n_test:>6} {s.train_seconds:>7.1f}  {curve}")


def format_results(results: Sequence[Result]) -> str:
    """A plain-text table of single-seed results."""
    return "\n".join([format_header(), *(format_row(summarize([r])) for r in results)])


@dataclass(frozen=True)
class RetrievalTask:
    """Held-out positives to retrieve: a catalogue of items, the users with a positive
    in the test part, what each user already rated in the training part (excluded from
    its ranking) and each item's count of training positives (the popularity baseline).

    ``item_xs[j]``/``item_keys[j]`` describe catalogue item ``j``; ``user_xs[u]`` user
    ``u``; ``seen[u]`` and ``relevant[u]`` are sets of catalogue indices.
    """

    item_xs: list[dict[str, Any]]
    item_keys: list[str]
    user_xs: list[dict[str, Any]]
    seen: list[frozenset[int]]
    relevant: list[frozenset[int]]
    popularity: np.ndarray


def retrieval_task(data: Examples, train: np.ndarray, test: np.ndarray) -> RetrievalTask:
    """The :class:`RetrievalTask` of a split: every item of the data is in the catalogue."""
    first_of_item: dict[str, int] = {}
    for i, x in enumerate(data.xs):
        first_of_item.setdefault(x["item_id"], i)
    item_keys = list(first_of_item)
    col = {k: j for j, k in enumerate(item_keys)}
    item_xs = [data.xs[i] for i in first_of_item.values()]
    seen: dict[str, set[int]] = {}
    pop = np.zeros(len(item_keys))
    for i in train:
        x = data.xs[i]
        seen.setdefault(x["user_id"], set()).add(col[x["item_id"]])
        pop[col[x["item_id"]]] += data.ys[i]
    relevant: dict[str, set[int]] = {}
    user_x: dict[str, dict[str, Any]] = {}
    for i in test:
        x = data.xs[i]
        if data.ys[i] > 0 and col[x["item_id"]] not in seen.get(x["user_id"], ()):
            relevant.setdefault(x["user_id"], set()).add(col[x["item_id"]])
            user_x.setdefault(x["user_id"], x)
    users = list(relevant)
    return RetrievalTask(item_xs, item_keys, [user_x[u] for u in users],
                         [frozenset(seen.get(u, ())) for u in users], [frozenset(relevant[u]) for u in users], pop)


def top_k(scores: np.ndarray, seen: Sequence[frozenset[int]], k: int) -> list[list[int]]:
    """The ``k`` best-scored catalogue indices of each row of ``scores`` (U, N), best
    first, leaving out each row's ``seen`` items (ties: lower index first)."""
    out = []
    for row, s in zip(scores, seen):
        row = row.astype(np.float64, copy=True)
        if s:
            row[list(s)] = -np.inf
        best = np.lexsort((np.arange(len(row)), -row))[:k]
        out.append([int(j) for j in best if np.isfinite(row[j])])
    return out


def simulator_prequential(make: Callable[[], Any], *, n_events: int, seed: int, batch_size: int = 1024,
                          config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Prequential (predict, then learn) metrics of a fresh learner on the first
    ``n_events`` impressions of the simulator stream with ``seed`` (``config``: further
    :class:`~streams.simulator.SimulatorConfig` fields)."""
    from learners.evaluate import prequential, xy_from_events
    from learners.metrics import PrequentialMetrics
    from streams.simulator import ClickSimulator, SimulatorConfig

    stream = xy_from_events(ClickSimulator(SimulatorConfig(seed=seed, **(config or {}))).events())
    metrics = prequential(make(), stream, batch_size=batch_size, metrics=PrequentialMetrics(), max_events=n_events)
    return metrics.snapshot()


def simulator_truth(*, n_events: int, seed: int, config: Mapping[str, Any] | None = None) -> dict[str, float]:
    """AUC and logloss of the simulator's own click probabilities (read as each
    impression is generated, so drift is included) on the first ``n_events``
    impressions of the stream with ``seed``: the ceiling no learner can pass."""
    from streams.simulator import ClickSimulator, SimulatorConfig

    sim = ClickSimulator(SimulatorConfig(seed=seed, **(config or {})))
    p, y = [], []
    for e in sim.events():
        if e.kind != "impression":
            continue
        p.append(sim.true_click_probability(e.user_id, e.item_id, e.position))
        y.append(float(e.label))
        if len(y) >= n_events:
            break
    pa, ya = np.asarray(p), np.asarray(y)
    return {"auc": roc_auc(ya, pa), "logloss": log_loss(ya, pa)}
