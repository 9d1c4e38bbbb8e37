"""On the simulated click stream, the learners rank as their generations promise.

Prequential AUC (predict each batch, then learn it) over the impressions of the first
200,000 simulator events (seed 1):

    hashed LR (gen 2)  >  item CTR (gen 1)  >  random (0.5),   River LR ~ hashed LR.

The numbers are printed (``pytest -s``) and attached to the test report as properties.
"""

from __future__ import annotations

import numpy as np
import pytest

from learners.evaluate import prequential, xy_from_events
from learners.metrics import PrequentialMetrics
from learners.registry import make_learner

SEED = 1
N_EVENTS = 200_000
BATCH = 256


class RandomLearner:
    """The floor: uniform random predictions, learning nothing."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def predict_proba_many(self, xs):
        return self.rng.random(len(xs))

    def learn_many(self, xs, ys):
        pass


@pytest.fixture(scope="module")
def stream():
    from streams.simulator import ClickSimulator, SimulatorConfig

    return list(xy_from_events(ClickSimulator(SimulatorConfig(seed=SEED)).events(max_events=N_EVENTS)))


def run(learner, stream) -> dict:
    return prequential(learner, stream, batch_size=BATCH, metrics=PrequentialMetrics(window=20_000)).snapshot()


@pytest.mark.slow
def test_prequential_auc_ordering(stream, record_property):
    results = {
        "random": run(RandomLearner(seed=SEED), stream),
        "ctr": run(make_learner("ctr"), stream),
        "lr": run(make_learner("lr"), stream),
        "river-lr": run(make_learner("river-lr"), stream),
    }
    print(f"\nsimulator seed={SEED}, {N_EVENTS} events, {len(stream)} impressions, batch {BATCH}")
    for name, s in results.items():
        print(f"  {name:9s} auc={s['auc']:.4f} rolling_auc={s['rolling_auc']:.4f} logloss={s['logloss']:.4f}")
        record_property(f"auc_{name}", round(s["auc"], 4))
    auc = {name: s["auc"] for name, s in results.items()}
    assert all(s["n"] == len(stream) for s in results.values())
    assert abs(auc["random"] - 0.5) < 0.01
    assert auc["ctr"] > 0.5 + 0.04, "the item CTR should beat random clearly"
    assert auc["lr"] > auc["ctr"] + 0.1, "personalised LR should beat the item CTR clearly"
    assert abs(auc["river-lr"] - auc["lr"]) < 0.03, "River LR and hashed LR should be close"
