"""Prequential evaluation: predict each event, score the prediction, then learn from it.

:func:`prequential_step` is the one place this test-then-train logic lives: the offline
:func:`prequential` loop and the live Kafka runtime (``learners.runtime``) both call it,
so an offline AUC and a live one mean the same thing.

>>> from learners.ctr import CTRLearner
>>> xy = [({"item_id": "a"}, 1), ({"item_id": "b"}, 0)] * 500
>>> m = prequential(CTRLearner(), xy, batch_size=100, metrics=PrequentialMetrics(window=500))
>>> m.snapshot()["n"], round(m.snapshot()["rolling_auc"], 3)
(1000, 1.0)
"""

from __future__ import annotations

from itertools import chain, islice
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np

from learners.base import X, event_to_x
from learners.metrics import PrequentialMetrics, as_labels
from streams.events import Event

__all__ = ["prequential", "prequential_step", "xy_from_events"]


def prequential_step(learner: Any, xs: Sequence[X], ys: Sequence[int] | np.ndarray, metrics: PrequentialMetrics) -> np.ndarray:
    """Test then train on one batch: predict ``xs``, update ``metrics``, learn ``(xs, ys)``.

    A learner with ``predict_learn_many(xs, ys)`` (returning the predictions made before
    learning) does both in one pass, e.g. hashing the batch once; otherwise
    ``predict_proba_many`` then ``learn_many``.

    Returns
    -------
    np.ndarray
        The predictions, shape (B,), made before the learner saw the labels.
    """
    y = as_labels(ys, len(xs))
    if not len(xs):
        return np.zeros(0)
    fused = getattr(learner, "predict_learn_many", None)
    if fused is not None:
        p = np.asarray(fused(xs, y), dtype=np.float64)
        metrics.update(y, p)
    else:
        p = np.asarray(learner.predict_proba_many(xs), dtype=np.float64)
        metrics.update(y, p)
        learner.learn_many(xs, y)
    return p


def xy_from_events(events: Iterable[Event], *, time_key: str | None = None) -> Iterator[tuple[dict[str, Any], int]]:
    """``(x, label)`` of each impression (requests and clicks are skipped).

    With ``time_key`` (e.g. ``"ctx:event_time"``), ``x[time_key]`` holds the event time in
    seconds, for :class:`~learners.ctr.CTRLearner` with ``time_unit="seconds"``; the
    hashed and River learners ignore ``ctx:event_time``.
    """
    for event in events:
        if event.kind != "impression":
            continue
        x = event_to_x(event)
        if time_key is not None:
            x[time_key] = event.event_time
        yield x, int(event.label)  # type: ignore[arg-type]


def _as_xy(stream: Iterable[Union[Event, tuple[X, int]]]) -> Iterator[tuple[X, int]]:
    """Pairs from pairs, or from the impressions of events (decided by the first item)."""
    it = iter(stream)
    first = next(it, None)
    if first is None:
        return
    rest = chain([first], it)
    if isinstance(first, Event):
        yield from xy_from_events(rest)  # type: ignore[arg-type]
    else:
        yield from rest  # type: ignore[misc]


def prequential(
    learner: Any,
    events_or_xy: Iterable[Union[Event, tuple[X, int]]],
    batch_size: int = 1024,
    metrics: PrequentialMetrics | None = None,
    *,
    max_events: int | None = None,
) -> PrequentialMetrics:
    """Run :func:`prequential_step` over a stream in batches of ``batch_size``.

    Parameters
    ----------
    learner
        Any learner (see :class:`learners.base.Learner`); it learns as it goes.
    events_or_xy
        :class:`~streams.events.Event` objects (only impressions are used) or
        ``(x, label)`` pairs.
    batch_size
        Examples per step; within a step all predictions precede all learning.
    metrics
        Updated in place; a new :class:`PrequentialMetrics` when ``None``.
    max_events
        Stop after this many examples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    metrics = PrequentialMetrics() if metrics is None else metrics
    stream = _as_xy(events_or_xy)
    if max_events is not None:
        stream = islice(stream, max_events)
    while True:
        chunk = list(islice(stream, batch_size))
        if not chunk:
            break
        xs = [x for x, _ in chunk]
        ys = np.fromiter((y for _, y in chunk), dtype=np.float64, count=len(chunk))
        prequential_step(learner, xs, ys, metrics)
    return metrics
