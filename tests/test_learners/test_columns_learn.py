"""Learners fed column batches learn exactly what they learn from per-event examples.

The per-event path: ``decode_events`` -> impressions -> ``event_to_x`` ->
``prequential_step``. The column path: ``decode_columns`` -> impression rows ->
``predict_learn_columns``. Same records (valid, and mutated ones the validator accepts or
rejects) must give the same predictions and the same final state, bit for bit.
"""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import orjson
import pytest

from learners.base import columns_to_xs, event_to_x
from learners.ctr import CTRLearner
from learners.evaluate import prequential_step
from learners.hashing import FeatureHasher
from learners.linear import HashedLogisticRegression
from learners.metrics import PrequentialMetrics
from streams.columns import EventColumns, decode_columns
from streams.events import Event, decode_events, encode_event
from streams.simulator import ClickSimulator, SimulatorConfig


def _records(seed: int, n: int) -> list[bytes]:
    return [encode_event(e) for e in ClickSimulator(SimulatorConfig(seed=seed)).events(max_events=n)]


def _mutated(raws: list[bytes], rng: random.Random) -> list[bytes]:
    """Some records broken (dead letters), some with extra/missing/odd features (valid,
    varying fields), a few with a true feature (msgspec refuses, the validator accepts)."""
    out = []
    for raw in raws:
        r = rng.random()
        if r < 0.05:
            out.append(raw[: len(raw) // 2])
            continue
        d = orjson.loads(raw)
        if r < 0.1:
            d["label"] = "yes"
        elif r < 0.2 and d.get("item_features"):
            d["item_features"] = {**d["item_features"], "extra": rng.choice(["a", 3, 2.5, ["x", "y"], True])}
        elif r < 0.25 and d.get("user_features"):
            d["user_features"] = dict(list(copy.deepcopy(d["user_features"]).items())[1:])
        out.append(json.dumps(d).encode())
    return out


def _state(learner) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in learner.state_dict().items()}


def _per_event(learner, batches: list[list[bytes]]) -> tuple[list[float], PrequentialMetrics]:
    metrics, preds = PrequentialMetrics(), []
    for raws in batches:
        imps = [e for e in decode_events(raws) if isinstance(e, Event) and e.kind == "impression"]
        if imps:
            ys = np.array([e.label for e in imps])
            preds += prequential_step(learner, [event_to_x(e) for e in imps], ys, metrics).tolist()
    return preds, metrics


def _columns(learner, batches: list[list[bytes]]) -> list[float]:
    preds = []
    for raws in batches:
        imps = decode_columns(raws)[0].of_kind("impression")
        if len(imps):
            preds += learner.predict_learn_columns(imps).tolist()
    return preds


@pytest.fixture(scope="module")
def batches() -> list[list[bytes]]:
    raws = _records(4, 6000)
    raws = raws[:3000] + _mutated(raws[3000:], random.Random(2))
    return [raws[i:i + 500] for i in range(0, len(raws), 500)]


@pytest.mark.parametrize("make", [
    lambda: HashedLogisticRegression(bits=16),
    lambda: HashedLogisticRegression(bits=14, optimizer="sgd", crosses=()),
    lambda: CTRLearner(half_life=500),
    lambda: CTRLearner(key="user_id"),
], ids=["lr-ftrl", "lr-sgd", "ctr-item", "ctr-user"])
def test_column_batches_learn_the_same_model(make, batches: list[list[bytes]]) -> None:
    a, b = make(), make()
    expected, _ = _per_event(a, batches)
    got = _columns(b, batches)
    assert len(got) == len(expected) > 4000
    assert got == expected
    assert _state(b) == _state(a)


def test_hasher_columns_match_dicts_with_uniform_and_mixed_fields(batches: list[list[bytes]]) -> None:
    h = FeatureHasher(bits=18, exclude=("u:age",))
    for raws in (batches[0], batches[-1]):  # uniform fields; mixed fields and dead letters
        cols = decode_columns(raws)[0].of_kind("impression")
        xs = columns_to_xs(cols)
        got, want = h.transform_columns(cols), h.transform(xs)
        for name in ("rows", "cols", "vals"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), name
        assert got.n_rows == want.n_rows == len(cols)
    events = [e for e in decode_events(batches[-1]) if isinstance(e, Event)]
    assert columns_to_xs(EventColumns.from_events(events)) == [event_to_x(e) for e in events]


def test_ctr_in_seconds_refuses_the_column_path() -> None:
    cols = decode_columns(_records(1, 50))[0].of_kind("impression")
    with pytest.raises(NotImplementedError):
        CTRLearner(time_unit="seconds").predict_learn_columns(cols)


@pytest.mark.parametrize("name, params", [("two-tower", {}), ("inttower", {}), ("dat", {}),
                                          ("two-tower", {"item_bias": True, "loss": "both", "random_negatives": 8})],
                         ids=["two-tower", "inttower", "dat", "two-tower-bias-softmax"])
def test_two_tower_family_learns_the_same_from_column_examples(name, params, batches) -> None:
    """What the runtime feeds a learner without predict_learn_columns: ColumnExamples of the
    batch. The two-tower encoder reads its fields from the columns; predictions and the
    final state (canonical digest) are bitwise those of the per-event path, and past the
    first batch (field inference reads examples once) no example dict is built at all
    with the BCE loss."""
    import torch

    from learners.base import ColumnExamples
    from learners.distributed import state_digest
    from learners.registry import make_learner

    torch.set_num_threads(1)
    kwargs = dict(out_dim=8, hidden=(16,), field_dim=4, seed=0, **params)
    a, b = make_learner(name, **kwargs), make_learner(name, **kwargs)
    expected, _ = _per_event(a, batches)
    got, built = [], []
    metrics = PrequentialMetrics()
    for raws in batches:
        imps = decode_columns(raws)[0].of_kind("impression")
        if len(imps):
            xs = ColumnExamples(imps)
            got += prequential_step(b, xs, imps.label, metrics).tolist()
            built.append(sum(x is not None for x in xs._rows))
    assert len(got) == len(expected) > 4000
    assert got == expected
    assert state_digest(b.state_dict()) == state_digest(a.state_dict())
    if params.get("loss", "bce") == "bce":
        assert built[0] > 0 and sum(built[1:]) == 0
