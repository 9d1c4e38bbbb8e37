"""Checks every learner must pass, River ``checks`` style.

Each check is a function taking a *factory* (a zero-argument callable returning a fresh
learner, always configured the same way) and raising ``AssertionError`` with a message
on failure. :func:`check_learner` runs them all; tests parametrize over
``learners.registry.available()`` so a newly registered learner is checked too.

The toy stream (:func:`toy_stream`) is small and separable: 30 users, 40 items, user and
item features, a position; an impression is clicked exactly when the item is one of the
"good" half (deterministic per item), so memorising items (an item CTR, an item weight,
an item embedding) is enough to learn it.

>>> from learners.ctr import CTRLearner
>>> check_learner(lambda: CTRLearner(half_life=10_000))
>>> [c.__name__ for c in all_checks()][:3]
['check_spec', 'check_predictions_are_probabilities', 'check_one_and_many_agree']
"""

from __future__ import annotations

import copy
import inspect
import pickle
import random
from typing import Any, Callable

import numpy as np

from learners.metrics import roc_auc

__all__ = [
    "check_learner",
    "all_checks",
    "toy_stream",
    "check_spec",
    "check_predictions_are_probabilities",
    "check_one_and_many_agree",
    "check_does_not_mutate_x",
    "check_learns_separable_stream",
    "check_checkpoint_round_trip",
    "check_learn_many_matches_learn_one",
    "check_predict_learn_many",
    "check_unseen_ids_and_features",
    "check_empty_batch",
    "check_deterministic",
]

Factory = Callable[[], Any]
_AGES = ("18-24", "25-34", "35-44", "45+")


def toy_stream(n: int = 3000, seed: int = 0, n_users: int = 30, n_items: int = 40) -> list[tuple[dict[str, Any], int]]:
    """``n`` separable ``(x, y)`` pairs: ``y = 1`` iff the item is in the good half.

    >>> xy = toy_stream(4)
    >>> sorted(xy[0][0])
    ['ctx:position', 'i:category', 'i:tags', 'item_id', 'u:age', 'u:gender', 'user_id']
    """
    rng = random.Random(seed)
    good = set(rng.sample(range(n_items), n_items // 2))
    out = []
    for _ in range(n):
        u = rng.randrange(n_users)
        i = rng.randrange(n_items)
        x = {
            "user_id": f"u{u}",
            "u:age": _AGES[u % len(_AGES)],
            "u:gender": "MF"[u % 2],
            "item_id": f"i{i}",
            "i:category": f"c{i % 5}",
            "i:tags": tuple(f"t{(i * k) % 7}" for k in range(1, 1 + i % 3)),
            "ctx:position": rng.randrange(5),
        }
        out.append((x, int(i in good)))
    return out


def _xs_ys(xy: list[tuple[dict[str, Any], int]]) -> tuple[list[dict[str, Any]], np.ndarray]:
    return [x for x, _ in xy], np.array([y for _, y in xy], dtype=np.float64)


def _learn_in_batches(learner: Any, xy: list[tuple[dict[str, Any], int]], batch: int = 100) -> None:
    for start in range(0, len(xy), batch):
        xs, ys = _xs_ys(xy[start : start + batch])
        learner.learn_many(xs, ys)


def _unseen() -> list[dict[str, Any]]:
    return [
        {"user_id": "never-seen-user", "item_id": "never-seen-item"},
        {"user_id": "u1", "item_id": "never-seen-item", "i:category": "c-new", "i:tags": ("t-new",)},
        {"user_id": "u1", "item_id": "i1", "u:new_feature": "z", "i:new_number": 2.5},
        {"user_id": "u2", "item_id": "i2"},  # ids only: every feature missing
        {"user_id": "u3", "item_id": "i3", "i:tags": ()},
    ]


def _trained(make: Factory, n: int = 1000) -> Any:
    learner = make()
    _learn_in_batches(learner, toy_stream(n, seed=1))
    return learner


def _assert_probabilities(p: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(p)
    assert arr.shape == (n,), f"{what}: expected shape ({n},), got {arr.shape}"
    assert np.issubdtype(arr.dtype, np.floating), f"{what}: expected floats, got {arr.dtype}"
    assert np.all(np.isfinite(arr)), f"{what}: non-finite predictions {arr}"
    assert np.all((arr >= 0) & (arr <= 1)), f"{what}: predictions outside [0, 1]: {arr}"
    return arr


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (a spec may store a tuple argument as a list)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_spec(make: Factory) -> None:
    """``.spec`` names the learner; its params are constructor arguments stored under their
    own names; ``make_learner(**spec)`` rebuilds the same spec when the name is registered."""
    learner = make()
    spec = learner.spec
    assert set(spec) == {"name", "params"}, f"spec must have exactly 'name' and 'params', got {sorted(spec)}"
    assert isinstance(spec["name"], str) and spec["name"], "spec['name'] must be a non-empty string"
    accepted = inspect.signature(type(learner)).parameters
    for key, value in spec["params"].items():
        assert key in accepted, f"spec param {key!r} is not a constructor argument of {type(learner).__name__}"
        assert hasattr(learner, key), f"constructor argument {key!r} is not stored as an attribute"
        stored = _plain(getattr(learner, key))
        assert stored == _plain(value), f"attribute {key!r} = {stored!r} but spec says {value!r}"
    from learners.registry import available, make_learner

    if spec["name"] in available():
        rebuilt = make_learner(spec["name"], **copy.deepcopy(spec["params"]))
        assert rebuilt.spec == spec, f"make_learner(**spec) gave spec {rebuilt.spec} instead of {spec}"


def check_predictions_are_probabilities(make: Factory) -> None:
    """Fresh and trained learners predict finite probabilities in [0, 1], one or many."""
    xs, _ = _xs_ys(toy_stream(50, seed=2))
    for state, learner in (("fresh", make()), ("trained", _trained(make))):
        _assert_probabilities(learner.predict_proba_many(xs), len(xs), f"{state} predict_proba_many")
        p = learner.predict_proba_one(xs[0])
        assert isinstance(p, float), f"{state} predict_proba_one must return a float, got {type(p).__name__}"
        _assert_probabilities(np.array([p]), 1, f"{state} predict_proba_one")


def check_one_and_many_agree(make: Factory) -> None:
    """``predict_proba_many(xs)[i] == predict_proba_one(xs[i])`` (to 1e-6)."""
    learner = _trained(make)
    xs, _ = _xs_ys(toy_stream(40, seed=3))
    many = np.asarray(learner.predict_proba_many(xs))
    one = np.array([learner.predict_proba_one(x) for x in xs])
    assert np.allclose(many, one, rtol=0, atol=1e-6), f"predict_proba_many and _one differ by {np.abs(many - one).max()}"


def check_does_not_mutate_x(make: Factory) -> None:
    """No method changes the examples it is given."""
    learner = make()
    xy = toy_stream(64, seed=4)
    xs, ys = _xs_ys(xy)
    before = copy.deepcopy(xs)
    learner.predict_proba_many(xs)
    learner.learn_many(xs, ys)
    learner.predict_proba_one(xs[0])
    try:
        learner.learn_one(xs[1], int(ys[1]))
    except NotImplementedError:
        pass
    if hasattr(learner, "predict_learn_many"):
        learner.predict_learn_many(xs, ys)
    assert xs == before, "the learner mutated its input examples"


def check_learns_separable_stream(make: Factory) -> None:
    """On the separable toy stream (3000 events, batches of 100), the prequential AUC
    over the last third is > 0.9."""
    learner = make()
    xy = toy_stream(3000, seed=5)
    ps, ys = [], []
    for start in range(0, len(xy), 100):
        xs, y = _xs_ys(xy[start : start + 100])
        ps.append(np.asarray(learner.predict_proba_many(xs)))
        ys.append(y)
        learner.learn_many(xs, y)
    p, y = np.concatenate(ps), np.concatenate(ys)
    tail = slice(2 * len(y) // 3, None)
    auc = roc_auc(y[tail], p[tail])
    assert auc > 0.9, f"prequential AUC on the last third of a separable stream is {auc:.3f} (want > 0.9)"


def check_checkpoint_round_trip(make: Factory) -> None:
    """state_dict -> pickle -> a fresh learner's load_state_dict: identical predictions,
    and identical predictions again after both learn the same further events."""
    a = _trained(make)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = make()
    b.load_state_dict(state)
    probe, _ = _xs_ys(toy_stream(50, seed=6))
    probe += _unseen()
    pa, pb = np.asarray(a.predict_proba_many(probe)), np.asarray(b.predict_proba_many(probe))
    assert np.array_equal(pa, pb), f"restored learner predicts differently (max diff {np.abs(pa - pb).max()})"
    more = toy_stream(300, seed=7)
    _learn_in_batches(a, more)
    _learn_in_batches(b, more)
    pa, pb = np.asarray(a.predict_proba_many(probe)), np.asarray(b.predict_proba_many(probe))
    assert np.array_equal(pa, pb), f"restored learner learns differently (max diff {np.abs(pa - pb).max()})"


def check_learn_many_matches_learn_one(make: Factory) -> None:
    """A learner with ``learn_many_is_sequential = True`` must give (to 1e-9) the same
    predictions after ``learn_many`` as after a loop of ``learn_one``. For every learner
    with ``learn_one``, ``learn_many`` of a single example equals ``learn_one``."""
    one = make()
    sequential = bool(getattr(one, "learn_many_is_sequential", False))
    xy = toy_stream(400 if sequential else 30, seed=8)
    probe, _ = _xs_ys(toy_stream(50, seed=9))
    try:
        for x, y in xy:
            one.learn_one(x, y)
    except NotImplementedError:
        return
    if sequential:
        many = make()
        _learn_in_batches(many, xy)
        a, b = np.asarray(one.predict_proba_many(probe)), np.asarray(many.predict_proba_many(probe))
        assert np.allclose(a, b, rtol=0, atol=1e-9), f"learn_many differs from learn_one (max diff {np.abs(a - b).max()})"
    singles = make()
    for x, y in xy:
        singles.learn_many([x], np.array([y], dtype=np.float64))
    a, b = np.asarray(one.predict_proba_many(probe)), np.asarray(singles.predict_proba_many(probe))
    assert np.allclose(a, b, rtol=0, atol=1e-9), f"learn_many([x]) differs from learn_one(x) (max diff {np.abs(a - b).max()})"


def check_predict_learn_many(make: Factory) -> None:
    """Where offered, ``predict_learn_many(xs, ys)`` returns ``predict_proba_many(xs)``
    and leaves the learner as ``learn_many(xs, ys)`` does."""
    a = make()
    if not hasattr(a, "predict_learn_many"):
        return
    b = make()
    xy = toy_stream(600, seed=10)
    probe, _ = _xs_ys(toy_stream(30, seed=11))
    for start in range(0, len(xy), 100):
        xs, ys = _xs_ys(xy[start : start + 100])
        fused = np.asarray(a.predict_learn_many(xs, ys))
        plain = np.asarray(b.predict_proba_many(xs))
        b.learn_many(xs, ys)
        assert np.array_equal(fused, plain), "predict_learn_many predicted differently from predict_proba_many"
    assert np.array_equal(a.predict_proba_many(probe), b.predict_proba_many(probe)), (
        "predict_learn_many learned differently from learn_many"
    )


def check_unseen_ids_and_features(make: Factory) -> None:
    """Unknown users, items, feature names and values, and missing fields are fine,
    before and after training."""
    for learner in (make(), _trained(make)):
        xs = _unseen()
        _assert_probabilities(learner.predict_proba_many(xs), len(xs), "unseen examples")
        learner.learn_many(xs[:3], np.array([1.0, 0.0, 1.0]))
        _assert_probabilities(learner.predict_proba_many(xs), len(xs), "unseen examples after learning them")


def check_empty_batch(make: Factory) -> None:
    """An empty batch predicts shape (0,) and learning it changes nothing."""
    learner = _trained(make, 300)
    probe, _ = _xs_ys(toy_stream(20, seed=12))
    before = np.asarray(learner.predict_proba_many(probe))
    p = np.asarray(learner.predict_proba_many([]))
    assert p.shape == (0,), f"predict_proba_many([]) must have shape (0,), got {p.shape}"
    learner.learn_many([], np.zeros(0))
    assert np.array_equal(before, learner.predict_proba_many(probe)), "learning an empty batch changed the learner"


def check_deterministic(make: Factory) -> None:
    """Two learners from the same factory fed the same stream predict identically."""
    a, b = _trained(make, 600), _trained(make, 600)
    probe, _ = _xs_ys(toy_stream(50, seed=13))
    assert np.array_equal(a.predict_proba_many(probe), b.predict_proba_many(probe)), (
        "same factory, same stream, different predictions: seed every random choice"
    )


def all_checks() -> list[Callable[[Factory], None]]:
    """Every check, in the order :func:`check_learner` runs them."""
    return [
        check_spec,
        check_predictions_are_probabilities,
        check_one_and_many_agree,
        check_does_not_mutate_x,
        check_learns_separable_stream,
        check_checkpoint_round_trip,
        check_learn_many_matches_learn_one,
        check_predict_learn_many,
        check_unseen_ids_and_features,
        check_empty_batch,
        check_deterministic,
    ]


def check_learner(make: Factory) -> None:
    """Run every check on learners built by ``make`` (raises on the first failure)."""
    for check in all_checks():
        check(make)
