"""The columnar item path: ``encode_item_columns`` / ``encode_items`` equal the dict path.

The reference is the learner's own dict path through ``FeatureEncoder.encode`` and the
item tower (``_tower``, what ``encode_items`` ran before the columnar path); vectors must
be bit-identical on random catalogues with multi-valued fields, unknown ids, unknown and
partly unknown tag tuples, missing values, numbers as categories and unhashable lists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learners.two_tower import make
from learners.two_tower.features import EmbeddingStore, FeatureEncoder

torch.set_num_threads(1)

FIELDS = ("i:category", "i:tags", "i:price")


def _stream(n: int, rng: np.random.Generator) -> tuple[list[dict], np.ndarray]:
    xs = []
    for _ in range(n):
        k = int(rng.integers(0, 4))
        xs.append({
            "user_id": f"u{rng.integers(0, 50)}",
            "u:age": int(rng.integers(18, 25)),
            "item_id": f"i{rng.integers(0, 300)}",
            "i:category": f"c{rng.integers(0, 12)}",
            "i:tags": tuple(f"t{t}" for t in rng.integers(0, 30, size=k)),
            "i:price": float(rng.choice([1.0, 2.5, 9.99, 3.0])),
            "ctx:position": int(rng.integers(0, 10)),
        })
    return xs, (rng.random(n) < 0.3).astype(np.float64)


def _trained(name: str, seed: int, **params):
    rng = np.random.default_rng(seed)
    learner = make(name, seed=seed, **params)
    xs, ys = _stream(1500, rng)
    for lo in range(0, len(xs), 256):
        learner.learn_many(xs[lo: lo + 256], ys[lo: lo + 256])
    return learner


def _catalogue(n: int, rng: np.random.Generator) -> list[dict]:
    """Known and unknown ids, tags known, unknown and mixed, missing fields, odd values
    (lists, a dict, numpy strings, bools, numbers as categories)."""
    items = []
    for _ in range(n):
        x: dict = {"item_id": f"i{rng.integers(0, 400)}" if rng.random() < 0.9 else None}
        r = rng.random()
        if r < 0.8:
            x["i:category"] = f"c{rng.integers(0, 15)}"  # c12..c14 never learned
        elif r < 0.85:
            x["i:category"] = int(rng.integers(0, 3))  # a number: a category of its own, unknown
        elif r < 0.9:
            x["i:category"] = [True, np.str_("c3"), {"odd": 1}, ("c1",)][int(rng.integers(0, 4))]
        r = rng.random()
        if r < 0.75:
            x["i:tags"] = tuple(f"t{t}" for t in rng.integers(0, 36, size=int(rng.integers(0, 5))))
        elif r < 0.8:
            x["i:tags"] = [f"t{t}" for t in rng.integers(0, 30, size=2)]  # a list: unhashable
        elif r < 0.85:
            x["i:tags"] = "t3"  # a single value in a multi-valued field
        elif r < 0.88:
            x["i:tags"] = ("t1", 3, 2.0, None)  # mixed members, feature keys of their own
        if rng.random() < 0.9:
            x["i:price"] = [1.0, 2.5, 9.99, 3, 7.5][int(rng.integers(0, 5))]  # 3 == 3.0 (learned), 7.5 unknown
        items.append(x)
    return items


def _columns(items: list[dict]) -> tuple[list, dict[str, list]]:
    return [x.get("item_id") for x in items], {f: [x.get(f) for x in items] for f in FIELDS}


def _reference(learner, items: list[dict]) -> np.ndarray:
    with torch.inference_mode():
        return learner._tower(items, "item").vec.numpy()


CASES = [
    ("two-tower", {}),
    ("two-tower", {"hidden": (16,), "out_dim": 8, "field_dim": 4}),
    ("inttower", {"fe": True, "lightse": True}),
    ("inttower", {"fe": True, "lightse": True, "fe_item_heads": 2, "hidden": (24,)}),
    ("dat", {}),
]


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_columns_equal_the_dict_path_on_random_catalogues(name, params, seed):
    learner = _trained(name, seed, **params)
    rng = np.random.default_rng(100 + seed)
    items = _catalogue(3000, rng)
    size = len(learner.store)
    want = _reference(learner, items)
    ids, cols = _columns(items)
    got = learner.encode_item_columns(ids, cols)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)
    # the dict path, in calls of any size, and small internal chunks agree too
    assert np.array_equal(learner.encode_items(items), want)
    assert np.array_equal(np.concatenate([learner.encode_items(items[lo: lo + 700]) for lo in range(0, 3000, 700)]),
                          np.concatenate([_reference(learner, items[lo: lo + 700]) for lo in range(0, 3000, 700)]))
    assert np.array_equal(learner.encode_item_columns(ids, cols, chunk=256), want)
    # a second call answers from the per-value codes and still agrees; nothing grew
    assert np.array_equal(learner.encode_item_columns(ids, cols), want)
    assert len(learner.store) == size


def test_unknown_ids_and_values_read_as_empty():
    learner = _trained("two-tower", 0, hidden=(8,), out_dim=8, field_dim=4)
    known = {"item_id": "i1", "i:category": "c1", "i:tags": ("t1", "t2"), "i:price": 2.5}
    empty = {"item_id": None}
    ghosts = [{"item_id": "ghost", "i:category": "nope", "i:tags": ("zz",), "i:price": 123.0},
              {"item_id": "ghost2", "i:tags": ()}]
    mixed = {"item_id": "i1", "i:category": "c1", "i:tags": ("t1", "zz", "t2"), "i:price": 2.5}
    v = learner.encode_item_columns(*_columns([known, empty, *ghosts, mixed, known]))
    # numbered bags (non-string members) with unknown keys serve one call: no pile-up
    odd = [{"item_id": "i1", "i:tags": ("t1", 2.5, "zz")}, {"item_id": "i1", "i:tags": (1.5, "yy")}]
    learner.encode_item_columns(*_columns(odd))
    n_codes = learner.encoder._tables["i:tags"].n
    assert np.array_equal(learner.encode_item_columns(*_columns(odd * 3)), _reference(learner, odd * 3))
    assert learner.encoder._tables["i:tags"].n == n_codes
    # every unknown reads as nothing: the ghosts are the all-empty item
    assert np.array_equal(v[2], v[1]) and np.array_equal(v[3], v[1])
    # an unknown tag leaves the bag of the known ones
    assert np.array_equal(v[4], v[0]) and np.array_equal(v[5], v[0])
    assert not np.array_equal(v[0], v[1])


def test_a_value_learned_after_a_call_counts_in_the_next():
    learner = _trained("two-tower", 0, hidden=(8,), out_dim=8, field_dim=4)
    items = [{"item_id": "i1", "i:tags": ("t1", "brand-new")}, {"item_id": "later", "i:category": "c99"}] * 3
    before = learner.encode_item_columns(*_columns(items))
    learner.learn_many([{"user_id": "u1", **x} for x in items], [1.0] * 6)
    after = learner.encode_item_columns(*_columns(items))
    assert np.array_equal(after, _reference(learner, items))
    assert not np.array_equal(after[0], before[0]) and not np.array_equal(after[1], before[1])


def test_rows_freed_by_expiry_are_not_served_from_stale_codes():
    learner = make("two-tower", seed=0, expire_after=2, expire_every=1, hidden=(8,), out_dim=8, field_dim=4)
    old = [{"user_id": "u", "item_id": "old", "i:tags": ("a", "b"), "i:price": 7.25}] * 4
    learner.learn_many(old, [1, 0, 1, 0])
    learner.encode_item_columns(["old"] * 4, {"i:tags": [("a", "b")] * 4, "i:price": [7.25] * 4})  # a code for 7.25
    for i in range(4):  # "old", "a", "b", 7.25 expire; their rows go to new ids
        learner.learn_many([{"user_id": f"v{i}", "item_id": f"new{i}", "i:tags": (f"n{i}",), "i:price": 0.5 + i}],
                           [1])
    assert "old" not in learner.store.table("item_id") and 7.2 not in learner.store.table("i:price")
    items = [{"item_id": "old", "i:tags": ("a", "b"), "i:price": 7.25},
             {"item_id": "new3", "i:tags": ("n3",), "i:price": 3.5}] * 4
    assert np.array_equal(learner.encode_item_columns(*_columns(items)), _reference(learner, items))


def test_numpy_columns_and_missing_columns():
    learner = _trained("dat", 0)
    rng = np.random.default_rng(7)
    items = [{"item_id": f"i{i}", "i:category": f"c{rng.integers(0, 14)}"} for i in range(200)]
    ids = np.array([x["item_id"] for x in items])
    cats = np.array([x["i:category"] for x in items], dtype=object)
    got = learner.encode_item_columns(ids, {"i:category": cats, "i:unused": [1] * 200})
    assert np.array_equal(got, _reference(learner, items))
    with pytest.raises(ValueError, match="column 'i:category' has 3 values for 200 ids"):
        learner.encode_item_columns(ids, {"i:category": ["a", "b", "c"]})
    assert learner.encode_item_columns([], {}).shape == (0, learner.out_dim)


def test_encode_columns_gives_the_rows_encode_gives():
    store = EmbeddingStore(3, torch.Generator().manual_seed(0))
    enc = FeatureEncoder(store, ("user_id",), ("item_id", "i:tags", "i:year"))
    enc.encode(None, [{"item_id": "a", "i:tags": ("x", "y", "x"), "i:year": 1995},
                      {"item_id": "b", "i:tags": ("z",), "i:year": 2001.0}], insert=True)
    items = [{"item_id": "b", "i:tags": ("z", "q"), "i:year": 2001},
             {"item_id": "q"},
             {"item_id": "a", "i:tags": ("x", "y", "x"), "i:year": 1995.0}]
    want = enc.encode(None, items, insert=False, unique=False).item
    bags = enc.encode_columns([x["item_id"] for x in items],
                              {f: [x.get(f) for x in items] for f in ("i:tags", "i:year")})
    got = bags.index()
    assert got.inverse.tolist() == want.inverse.tolist()
    assert got.offsets.tolist() == want.offsets.tolist()
    assert (got.batch_size, got.n_fields) == (3, 3)
    # a range cuts the same bags
    part = bags.index(1, 3)
    assert part.inverse.tolist() == enc.encode(None, items[1:], insert=False, unique=False).item.inverse.tolist()
