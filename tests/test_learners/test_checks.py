"""The shared learner checks over every registered learner; the checks, the registry and
the prequential loop themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from learners import checks
from learners.ctr import CTRLearner
from learners.evaluate import prequential, prequential_step
from learners.metrics import PrequentialMetrics
from learners.registry import available, make_learner, register
from streams.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# Small, fast settings per learner (the checks are about the contract, not capacity);
# a learner not listed is built with its defaults.
_SMALL_TOWERS = {"field_dim": 4, "hidden": [16], "out_dim": 8}
PARAMS: dict[str, dict[str, Any]] = {
    "lr": {"bits": 16},
    "two-tower": _SMALL_TOWERS,
    "inttower": _SMALL_TOWERS,
    "dat": _SMALL_TOWERS,
}


@pytest.mark.parametrize("check", checks.all_checks(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", available())
def test_every_registered_learner_passes_every_check(name, check):
    check(lambda: make_learner(name, **PARAMS.get(name, {})))


# -- the checks catch what they claim to catch ----------------------------------------


class Broken(CTRLearner):
    """A CTR learner with one defect switched on."""

    def __init__(self, defect: str = "", **params: Any) -> None:
        super().__init__(**params)
        self.defect = defect

    @property
    def spec(self) -> dict[str, Any]:
        spec = super().spec
        spec["params"]["defect"] = self.defect
        return {"name": "broken", "params": spec["params"]}

    def predict_proba_many(self, xs):
        p = super().predict_proba_many(xs)
        if self.defect == "above_one":
            p = p + 1.0
        if self.defect == "one_differs" and len(xs) > 1:
            p = p * 0.5
        return p

    def learn_many(self, xs, ys):
        if self.defect == "mutates":
            for x in xs:
                x["seen"] = 1
        if self.defect == "no_learning":
            return
        super().learn_many(xs, ys)

    def load_state_dict(self, state):
        if self.defect == "forgets_state":
            return
        if self.defect == "forgets_clock":
            state = dict(state, n_learned=0)
        super().load_state_dict(state)


@pytest.mark.parametrize(
    ("defect", "check"),
    [
        ("above_one", checks.check_predictions_are_probabilities),
        ("one_differs", checks.check_one_and_many_agree),
        ("mutates", checks.check_does_not_mutate_x),
        ("no_learning", checks.check_learns_separable_stream),
        ("forgets_state", checks.check_checkpoint_round_trip),
        ("forgets_clock", checks.check_checkpoint_round_trip),  # same predictions, different learning
    ],
)
def test_a_check_fails_a_learner_with_its_defect(defect, check):
    with pytest.raises(AssertionError):
        check(lambda: Broken(defect=defect, half_life=1000))
    check(lambda: Broken(defect="", half_life=1000))  # and passes the same learner without it


def test_sequential_claim_is_checked():
    class BatchyCTR(CTRLearner):
        """Claims learn_many == learn_one, but learns only the first example of a batch."""

        def learn_many(self, xs, ys):
            super().learn_many(xs[:1], np.asarray(ys)[:1])

    with pytest.raises(AssertionError, match="learn_many differs from learn_one"):
        checks.check_learn_many_matches_learn_one(lambda: BatchyCTR())


def test_check_spec_catches_a_param_not_stored_under_its_name():
    class Renamed(CTRLearner):
        def __init__(self, hl: float = 10.0) -> None:
            super().__init__(half_life=hl)

    with pytest.raises(AssertionError, match="half_life"):
        checks.check_spec(lambda: Renamed())


def test_toy_stream_is_separable_by_item():
    xy = checks.toy_stream(2000)
    label_of_item: dict[str, set[int]] = {}
    for x, y in xy:
        label_of_item.setdefault(x["item_id"], set()).add(y)
    assert all(len(labels) == 1 for labels in label_of_item.values())
    assert 0.3 < np.mean([y for _, y in xy]) < 0.7


# -- the registry ------------------------------------------------------------------------


def test_registry_lists_both_generations_and_the_two_tower_family():
    assert {"ctr", "lr", "river-lr", "two-tower", "inttower", "dat"} <= set(available())
    assert available() == sorted(available())


def test_registry_errors_are_config_errors():
    with pytest.raises(ConfigError, match="unknown learner 'nope'"):
        make_learner("nope")
    with pytest.raises(ConfigError, match="bad parameters for learner 'ctr'"):
        make_learner("ctr", no_such_param=1)
    with pytest.raises(ConfigError, match="half_life"):
        make_learner("ctr", half_life=-1)


def test_register_refuses_to_silently_replace():
    register("test-ctr", CTRLearner)
    register("test-ctr", CTRLearner)  # the same registration again is fine
    with pytest.raises(ValueError, match="already registered"):
        register("test-ctr", "learners.linear:HashedLogisticRegression")
    register("test-ctr", "learners.linear:HashedLogisticRegression", bind={"bits": 10}, replace=True)
    assert make_learner("test-ctr").spec["params"]["bits"] == 10
    with pytest.raises(ValueError, match="module:attribute"):
        register("test-bad", "no_colon")


def test_building_generation_one_and_two_does_not_import_torch():
    code = (
        "import sys\n"
        "from learners.registry import make_learner, available\n"
        "available(); make_learner('ctr'); make_learner('lr', bits=10)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)


# -- the prequential loop -------------------------------------------------------------------


class Spy:
    """Predicts the mean label learned so far; records the order of calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.seen: list[float] = []

    def predict_proba_many(self, xs):
        self.calls.append("predict")
        return np.full(len(xs), np.mean(self.seen) if self.seen else 0.5)

    def learn_many(self, xs, ys):
        self.calls.append("learn")
        self.seen.extend(np.asarray(ys).tolist())


def test_prequential_step_scores_before_learning():
    spy = Spy()
    m = PrequentialMetrics(window=10)
    p = prequential_step(spy, [{}, {}], [1, 1], m)
    assert spy.calls == ["predict", "learn"]
    assert p.tolist() == [0.5, 0.5]  # the labels were not known when predicting
    assert m.snapshot()["n"] == 2 and m.snapshot()["rolling_logloss"] == pytest.approx(-np.log(0.5))


def test_prequential_step_prefers_the_fused_path():
    class Fused(Spy):
        def predict_learn_many(self, xs, ys):
            self.calls.append("fused")
            return np.full(len(xs), 0.25)

    spy = Fused()
    m = PrequentialMetrics()
    assert prequential_step(spy, [{}], [0], m).tolist() == [0.25]
    assert spy.calls == ["fused"]
    assert m.snapshot()["logloss"] == pytest.approx(-np.log(0.75))


def test_prequential_batches_and_uses_only_impressions():
    from streams.events import Event

    def ev(kind: str, k: int, label: int | None = None) -> Event:
        extra = {} if kind == "request" else {"item_id": "i", "label": label, "position": 0}
        return Event(kind=kind, event_id=str(k), event_time=float(k), user_id="u", request_id="r", **extra)

    events = [ev("request", 0)] + [ev("impression", k, k % 2) for k in range(1, 11)] + [ev("click", 11, 1)]
    spy = Spy()
    m = prequential(spy, events, batch_size=4)
    assert m.snapshot()["n"] == 10
    assert spy.calls == ["predict", "learn"] * 3  # 4 + 4 + 2
    assert spy.seen == [float(k % 2) for k in range(1, 11)]
    spy2 = Spy()
    assert prequential(spy2, [({}, 1)] * 5, batch_size=2, max_events=3).snapshot()["n"] == 3
    with pytest.raises(ValueError):
        prequential(Spy(), [], batch_size=0)
