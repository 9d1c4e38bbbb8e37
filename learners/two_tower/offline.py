"""The papers' offline protocol on the streaming code: MovieLens, splits, AUC/logloss, ablations.

Protocol (IntTower, CIKM'22, sec. 4): every rating is an example, ``rating >= 4`` is a
click (positive), anything lower a non-click; 80/20 split, either *random* (seeded) or
by *time* (the oldest 80% train, the newest 20% test); the learner trains ``epochs``
passes over the training part in mini-batches - the same ``learn_many`` the stream uses
- and the test part is scored once: ROC AUC and logloss. Differences from the official
code, stated so numbers are compared fairly: it drops 3-star ratings and feeds user and
item mean ratings computed on each split (including the test split) as dense features;
we keep every rating and use no rating-derived feature.

MovieLens is read by :mod:`streams.replay` (features identical to the replayed stream).
That reader refuses damaged files; ``skip_bad_rows=True`` reads ml-100k leniently
instead: a rating row that is not four integers, has a rating outside 1..5 or an
unknown user/item is skipped and counted, and timestamps outside the data set's
documented period are counted (kept: they do not affect a random split but make a time
split unreliable).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from learners.base import event_to_x
from learners.metrics import log_loss, roc_auc
from streams.errors import ConfigError

__all__ = [
    "Examples",
    "Result",
    "Split",
    "movielens_examples",
    "split_examples",
    "train_and_evaluate",
    "simulator_prequential",
    "format_results",
    "ABLATIONS",
    "PAPER_NOTE",
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

#: What the paper reports, for the side-by-side print.
PAPER_NOTE = (
    "IntTower paper (Li et al., CIKM'22), overall-performance table, MovieLens-1M: two-tower-family "
    "pre-ranking baselines (Two-Tower/DSSM, DAT, COLD) at AUC about 0.88-0.89, IntTower above them. "
    "The exact cells could not be retrieved in this workspace (the official repository shows the table "
    "only as an image, figure/performance.PNG), so no exact figure is printed. Their protocol differs: "
    "ml-1m (10x the ratings), 3-star ratings dropped, and mean-rating features computed on each split."
)

# ml-100k's README: ratings collected 19 Sep 1997 - 22 Apr 1998 (UTC epoch seconds).
_ML100K_PERIOD = (874_724_710, 893_286_638)


@dataclass(frozen=True)
class Examples:
    """Examples ``xs`` (learner dicts), labels ``ys`` (N,), times ``times`` (N,) seconds,
    where they came from, and what was skipped or doubtful on the way."""

    xs: list[dict[str, Any]]
    ys: np.ndarray
    times: np.ndarray
    source: str
    notes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """Test AUC and logloss of one trained model, with sizes and training time."""

    model: str
    auc: float
    logloss: float
    n_train: int
    n_test: int
    train_seconds: float


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


def movielens_examples(path: str | Path, *, skip_bad_rows: bool = False, threshold: int = 4) -> Examples:
    """Every rating of the MovieLens data in ``path`` as an example (``rating >= threshold`` is 1)."""
    from streams.replay import iter_movielens_events, load_movielens

    p = Path(path)
    try:
        ml, notes = load_movielens(p), {}
    except ConfigError as exc:
        if not skip_bad_rows:
            raise ConfigError(f"{exc} (or pass --skip-bad-rows to train on the rows that parse)") from None
        if not (p / "u.data").is_file():
            raise
        ml, notes = _lenient_ml100k(p)
        logger.warning("read %s leniently: %s", p, notes)
    xs, ys, times = [], [], []
    for e in iter_movielens_events(ml, click_threshold=threshold):
        if e.kind == "impression":
            x = event_to_x(e, with_position=False)
            xs.append(x)
            ys.append(e.label)
            times.append(e.event_time)
    notes["examples"] = len(xs)
    return Examples(xs, np.array(ys, dtype=np.float64), np.array(times), f"{ml.name} at {p}", notes)


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
) -> Result:
    """Train a fresh learner ``make()`` for ``epochs`` passes over ``train`` (reshuffled
    each epoch when ``shuffle``; in the given order otherwise) and score ``test``."""
    learner = make()
    xs, ys = data.xs, data.ys
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(train) if shuffle else train
        for lo in range(0, len(order), batch_size):
            idx = order[lo: lo + batch_size]
            learner.learn_many([xs[i] for i in idx], ys[idx])
    seconds = time.perf_counter() - t0
    p = np.concatenate([np.asarray(learner.predict_proba_many([xs[i] for i in test[lo: lo + 4096]]), dtype=np.float64)
                        for lo in range(0, len(test), 4096)])
    y = ys[test]
    return Result(name, roc_auc(y, p), log_loss(y, p), len(train), len(test), seconds)


def format_results(results: Sequence[Result]) -> str:
    """A plain-text table of results."""
    lines = [f"{'model':<22} {'AUC':>7} {'logloss':>8} {'train':>7} {'test':>6} {'train s':>8}"]
    for r in results:
        lines.append(f"{r.model:<22} {r.auc:>7.4f} {r.logloss:>8.4f} {r.n_train:>7} {r.n_test:>6} {r.train_seconds:>8.1f}")
    return "\n".join(lines)


def simulator_prequential(make: Callable[[], Any], *, n_events: int, seed: int, batch_size: int = 1024) -> dict[str, Any]:
    """Prequential (predict, then learn) metrics of a fresh learner on the first
    ``n_events`` impressions of the simulator stream with ``seed``."""
    from learners.evaluate import prequential, xy_from_events
    from learners.metrics import PrequentialMetrics
    from streams.simulator import ClickSimulator, SimulatorConfig

    stream = xy_from_events(ClickSimulator(SimulatorConfig(seed=seed)).events())
    metrics = prequential(make(), stream, batch_size=batch_size, metrics=PrequentialMetrics(), max_events=n_events)
    return metrics.snapshot()
