"""The hasher's caches (value codes, multi-valued groups) never change a bucket.

A hasher that has seen many batches (warm caches, groups added batch after batch, caches
cleared when full) must give, entry for entry, what a fresh hasher gives for each batch
alone, and what the slow per-feature path gives.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from learners.hashing import FeatureHasher

FIELDS = ["user_id", "u:a", "u:b", "item_id", "i:c", "i:tags", "ctx:position"]


def _example(rng: random.Random, fields: list[str]) -> dict:
    x = {}
    for f in fields:
        r = rng.random()
        if f == "ctx:position":
            x[f] = rng.choice([0, 1, 2, 3.0, 2.5, -1, 2**40])
        elif r < 0.2:  # multi-valued, sometimes empty or of one element
            x[f] = tuple(rng.choice("abcdefgh") + str(rng.randrange(50)) for _ in range(rng.randrange(0, 4)))
        elif r < 0.3:
            x[f] = rng.choice([1, 0.5, -3, 7.0, 2**35])
        else:
            x[f] = rng.choice(["p", "q", "r", "ü"]) + str(rng.randrange(200))
    return x


def _entries(batch) -> Counter:
    return Counter(zip(batch.rows.tolist(), batch.cols.tolist(), batch.vals.tolist()))


def _same(a, b) -> bool:
    return (a.n_rows == b.n_rows and np.array_equal(a.rows, b.rows) and np.array_equal(a.cols, b.cols)
            and np.array_equal(a.vals, b.vals))


@pytest.mark.parametrize("max_cache", [1_000_000, 40])
def test_a_warm_hasher_hashes_like_a_fresh_one_entry_for_entry(max_cache: int) -> None:
    rng = random.Random(7)
    warm = FeatureHasher(bits=20, max_cache=max_cache)
    for _ in range(30):
        fields = rng.sample(FIELDS, rng.randrange(2, len(FIELDS) + 1))
        xs = [_example(rng, fields) for _ in range(rng.randrange(1, 60))]
        got = warm.transform(xs)
        assert _same(got, FeatureHasher(bits=20).transform(xs))  # same entries, same order
        # the per-feature path (rows hashed one by one) agrees on the multiset of entries
        alone = FeatureHasher(bits=20)
        expected = Counter()
        for row, x in enumerate(xs):
            b = alone.transform([x])
            expected.update(zip([row] * len(b.cols), b.cols.tolist(), b.vals.tolist()))
        assert _entries(got) == expected


def test_new_multi_valued_groups_after_the_first_batch_are_hashed_from_their_own_values() -> None:
    h = FeatureHasher(bits=24, crosses=[])
    first = h.transform([{"i:tags": ("a", "b")}])
    later = h.transform([{"i:tags": ("c",)}, {"i:tags": ("a", "b")}, {"i:tags": ("d", "e", "f")}])
    fresh = FeatureHasher(bits=24, crosses=[])
    assert sorted(first.cols.tolist()) == sorted(fresh.transform([{"i:tags": ("b", "a")}]).cols.tolist())
    by_row = {r: sorted(later.cols[later.rows == r].tolist()) for r in range(3)}
    assert by_row[1] == sorted(first.cols.tolist())
    assert by_row[0] == fresh.transform([{"i:tags": ("c",)}]).cols.tolist()
    assert by_row[2] == sorted(fresh.transform([{"i:tags": ("f", "e", "d")}]).cols.tolist())
    assert len(set(by_row[0] + by_row[1] + by_row[2])) == 6
