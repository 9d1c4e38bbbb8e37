"""Feature hashing, the hashed FTRL/SGD logistic regression and the River reference."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from learners.hashing import FeatureHasher, feature_tokens, stable_hash
from learners.linear import HashedLogisticRegression
from learners.river_lr import RiverLogisticRegression, river_features

ROOT = Path(__file__).resolve().parents[2]

X1 = {
    "user_id": "u1",
    "u:age": "25-34",
    "u:score": 0.25,
    "item_id": "i7",
    "i:category": "c3",
    "i:tags": ("t1", "t2"),
    "ctx:position": 2,
}


def entries(hasher: FeatureHasher, x) -> Counter:
    b = hasher.transform([x])
    return Counter(zip(b.cols.tolist(), b.vals.tolist()))


def test_stable_hash_is_crc32_of_the_token():
    # zlib's CRC-32 check value for "123456789"
    assert stable_hash("123456789") == 0xCBF43926


def test_token_counts_values_and_crosses():
    h = FeatureHasher(bits=20, crosses=[("user_id", "i:*"), ("u:age", "i:category")])
    b = h.transform([X1])
    # 8 base tokens (tags give 2); crosses: user_id x (category, 2 tags) = 3, age x category = 1
    assert len(b.cols) == 8 + 3 + 1
    assert set(b.rows.tolist()) == {0}
    assert sorted(b.vals.tolist()) == [0.25] + [1.0] * 11
    assert b.cols.min() >= 0 and b.cols.max() < 2**20


def test_a_number_crossed_carries_its_value():
    h = FeatureHasher(bits=20, crosses=[("u:score", "i:category")])
    b = h.transform([X1])
    assert sorted(b.vals.tolist()).count(0.25) == 2  # the number and its cross


def test_numbers_are_values_unless_categorical():
    h = FeatureHasher(bits=24, crosses=())
    three, four = h.transform([{"u:n": 3}]), h.transform([{"u:n": 4.5}])
    assert three.cols.tolist() == four.cols.tolist()  # one token "u:n" ...
    assert (three.vals.tolist(), four.vals.tolist()) == ([3.0], [4.5])  # ... carrying the number
    p3, p4, p3f = (h.transform([{"ctx:position": v}]) for v in (3, 4, 3.0))
    assert p3.cols.tolist() != p4.cols.tolist()  # one token per position
    assert p3.cols.tolist() == p3f.cols.tolist() and p3.vals.tolist() == p3f.vals.tolist() == [1.0]
    big = h.transform([{"u:n": 2**40}, {"u:n": -7}])
    assert big.vals.tolist() == [2.0**40, -7.0]


def test_hashing_ignores_key_order_tuple_order_and_container_type():
    h = FeatureHasher(bits=22)
    reordered = dict(reversed(list(X1.items())))
    reordered["i:tags"] = ("t2", "t1")
    as_list = dict(X1, **{"i:tags": ["t1", "t2"]})
    base = entries(h, X1)
    assert entries(h, reordered) == base
    assert entries(h, as_list) == base
    assert entries(h, MappingProxyType(X1)) == base
    assert entries(FeatureHasher(bits=22), X1) == base  # a fresh hasher (cold cache) agrees


def test_batches_with_mixed_fields_hash_each_row_as_alone():
    h = FeatureHasher(bits=20)
    xs = [X1, {"user_id": "u2", "item_id": "i9"}, {"user_id": "u3", "i:category": "c1", "u:age": "18-24"}, X1]
    b = h.transform(xs)
    for row, x in enumerate(xs):
        mine = Counter(zip(b.cols[b.rows == row].tolist(), b.vals[b.rows == row].tolist()))
        assert mine == entries(h, x)


def test_excluded_fields_and_crosses_differ_by_direction():
    h = FeatureHasher(bits=24, crosses=[("u:a", "i:b")])
    with_time = dict(X1, **{"ctx:event_time": 1.7e9})
    assert entries(h, with_time) == entries(h, X1)
    ab = h.transform([{"u:a": "x", "i:b": "y"}]).cols
    ba = FeatureHasher(bits=24, crosses=[("i:b", "u:a")]).transform([{"u:a": "x", "i:b": "y"}]).cols
    assert set(ab.tolist()) != set(ba.tolist())


def test_bad_feature_values_are_rejected_clearly():
    with pytest.raises(TypeError, match="feature 'u:bad'"):
        FeatureHasher().transform([{"u:bad": {"a": 1}}])
    with pytest.raises(TypeError, match="feature 'i:tags'"):
        FeatureHasher().transform([{"user_id": "u", "i:tags": ("a", 3)}])
    with pytest.raises(ValueError, match="feature 'u:x'"):
        FeatureHasher().transform([{"u:x": float("inf")}])
    with pytest.raises(ValueError):
        FeatureHasher(bits=40)


HASH_SCRIPT = """
import json, sys
from learners.hashing import FeatureHasher
x = json.loads(sys.argv[1])
x["i:tags"] = tuple(x["i:tags"])
print(json.dumps(FeatureHasher(bits=20).transform([x]).cols.tolist()))
"""


def test_hash_indices_are_identical_in_other_processes():
    import json

    expected = FeatureHasher(bits=20).transform([X1]).cols.tolist()
    for seed in ("1", "2", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run(
            [sys.executable, "-c", HASH_SCRIPT, json.dumps(X1)], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == expected


RESTORE_SCRIPT = """
import pickle, sys
import numpy as np
from learners.registry import make_learner
state, probe = pickle.load(open(sys.argv[1], "rb"))
lrn = make_learner(state["spec"]["name"], **state["spec"]["params"])
lrn.load_state_dict(state)
np.save(sys.argv[2], lrn.predict_proba_many(probe))
"""


def test_checkpoint_restores_in_another_process(tmp_path):
    from learners.checks import toy_stream

    lrn = HashedLogisticRegression(bits=18)
    xy = toy_stream(2000, seed=3)
    for s in range(0, len(xy), 100):
        lrn.learn_many([x for x, _ in xy[s : s + 100]], [y for _, y in xy[s : s + 100]])
    probe = [x for x, _ in toy_stream(50, seed=4)]
    with open(tmp_path / "state.pkl", "wb") as f:
        pickle.dump((lrn.state_dict(), probe), f)
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, str(tmp_path / "state.pkl"), str(tmp_path / "p.npy")],
        env=env, check=True,
    )
    assert np.array_equal(np.load(tmp_path / "p.npy"), lrn.predict_proba_many(probe))


def item_stream(n: int, seed: int):
    """Clicks drawn with a known CTR per item: a logistic model in the item one-hot."""
    rng = np.random.default_rng(seed)
    true_ctr = np.linspace(0.02, 0.6, 12)
    items = rng.integers(0, len(true_ctr), n)
    ys = (rng.random(n) < true_ctr[items]).astype(float)
    return [{"item_id": f"i{i}"} for i in items], ys, true_ctr


@pytest.mark.parametrize(
    "params",
    [
        {"optimizer": "ftrl", "alpha": 0.3, "l2": 0.0},
        {"optimizer": "sgd", "lr": 0.005, "l2": 0.0},
    ],
)
def test_learns_the_true_click_probabilities(params):
    xs, ys, true_ctr = item_stream(60_000, seed=0)
    lrn = HashedLogisticRegression(bits=16, crosses=(), **params)
    for s in range(0, len(xs), 256):
        lrn.learn_many(xs[s : s + 256], ys[s : s + 256])
    p = lrn.predict_proba_many([{"item_id": f"i{i}"} for i in range(len(true_ctr))])
    assert np.abs(p - true_ctr).max() < 0.05


def test_l1_zeroes_rare_weights():
    xs, ys, _ = item_stream(5_000, seed=1)
    xs = [dict(x, rare=f"r{k}") for k, x in enumerate(xs)]  # a feature seen once per value
    dense = HashedLogisticRegression(bits=18, crosses=(), l1=0.0)
    sparse = HashedLogisticRegression(bits=18, crosses=(), l1=5.0)
    for lrn in (dense, sparse):
        for s in range(0, len(xs), 128):
            lrn.learn_many(xs[s : s + 128], ys[s : s + 128])
    probe = [{"item_id": "i3", "rare": f"r{k}"} for k in range(50)]
    without = {"item_id": "i3"}
    assert np.all(sparse.predict_proba_many(probe) == sparse.predict_proba_one(without))
    assert np.any(dense.predict_proba_many(probe) != dense.predict_proba_one(without))


def test_checkpoint_of_another_shape_is_refused():
    state = HashedLogisticRegression(bits=12).state_dict()
    with pytest.raises(ValueError, match="bits"):
        HashedLogisticRegression(bits=14).load_state_dict(state)
    with pytest.raises(ValueError, match="optimizer"):
        HashedLogisticRegression(bits=12, optimizer="sgd").load_state_dict(state)


def test_labels_are_validated():
    lrn = HashedLogisticRegression(bits=10)
    with pytest.raises(ValueError, match="2 labels for 3"):
        lrn.learn_many([X1, X1, X1], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        lrn.learn_many([X1], [3])


@pytest.mark.parametrize("bad", [{"optimizer": "adamw"}, {"alpha": 0}, {"l1": -1}])
def test_bad_parameters(bad):
    with pytest.raises(ValueError):
        HashedLogisticRegression(**bad)


def test_river_features_use_the_same_tokens_as_the_hasher():
    crosses = [("user_id", "i:*"), ("u:*", "i:*")]
    feats = river_features(X1, crosses)
    assert feats["user_id=u1"] == 1.0
    assert feats["i:tags=t2"] == 1.0
    assert feats["u:score"] == 0.25
    assert feats["ctx:position=2"] == 1.0
    assert feats["user_id=u1&i:tags=t1"] == 1.0
    assert feats["u:score&i:category=c3"] == 0.25
    assert len(feats) == len(FeatureHasher(bits=24, crosses=crosses).transform([X1]).cols)
    assert [t for t, _ in feature_tokens("i:tags", ("a", "b"))] == ["i:tags=a", "i:tags=b"]


def test_river_lr_learns_the_true_click_probabilities():
    xs, ys, true_ctr = item_stream(30_000, seed=2)
    lrn = RiverLogisticRegression(lr=0.02, crosses=())
    lrn.learn_many(xs, ys)
    p = lrn.predict_proba_many([{"item_id": f"i{i}"} for i in range(len(true_ctr))])
    assert np.abs(p - true_ctr).max() < 0.08


@pytest.mark.parametrize(
    "params",
    [
        {"optimizer": "ftrl"},
        {"optimizer": "ftrl", "l1": 0.0, "l2": 0.0},
        {"optimizer": "sgd", "lr": 0.01, "l2": 0.1},
        {"optimizer": "sgd", "lr": 0.01, "l2": 0.0},
    ],
)
def test_compiled_kernels_learn_bitwise_what_the_numpy_step_learns(params):
    """The numba kernels (learners._kernels) replace numpy expressions term for term: on a
    stream with numbers, multi-valued features, crosses and repeated coordinates, the
    predictions and every model array must be bitwise equal, batch after batch."""
    xs, ys, _ = item_stream(6_000, seed=3)
    rng = np.random.default_rng(3)
    xs = [dict(x, user_id=f"u{rng.integers(0, 40)}", **{"u:score": float(rng.normal()),
                                                         "i:tags": tuple(f"t{t}" for t in rng.integers(0, 9, 2)),
                                                         "ctx:position": int(rng.integers(0, 5))})
          for x in xs]
    fast = HashedLogisticRegression(bits=12, **params)
    slow = HashedLogisticRegression(bits=12, **params)
    slow.use_kernels = False
    assert fast.use_kernels
    for s in range(0, len(xs), 500):
        p_fast = fast.predict_learn_many(xs[s:s + 500], ys[s:s + 500])
        p_slow = slow.predict_learn_many(xs[s:s + 500], ys[s:s + 500])
        assert np.array_equal(p_fast, p_slow)
    assert np.any(p_fast != p_fast[0])  # it learned something that tells examples apart
    for name, value in fast.state_dict().items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, slow.state_dict()[name]), name
    assert np.array_equal(fast.predict_proba_many(xs[:100]), slow.predict_proba_many(xs[:100]))
