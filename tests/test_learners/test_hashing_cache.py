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


@pytest.mark.parametrize("block_slots,max_cache", [(1 << 16, 1_000_000), (8, 1_000_000), (4, 60)])
def test_column_batches_hash_like_their_dicts_whatever_the_block_tables_hold(block_slots: int,
                                                                              max_cache: int) -> None:
    """transform_columns reads each interned mapping's codes from a direct-mapped table: with
    room for every mapping, with a table so small that mappings keep taking each other's
    slots (two in one slot in a batch fall back to value look-ups), and with the value cache
    cleared under it (which empties the tables), every batch hashes exactly like the dict
    path of a fresh hasher."""
    from learners.base import columns_to_xs
    from streams.columns import FeatureBlocks, decode_columns
    from streams.events import Event, encode_event

    rng = random.Random(11)
    users = [{"a": rng.choice(["p", "q"]) + str(k), "s": rng.choice([0.5, -3, 7.0, 2**35, 4]),
              "t": tuple(rng.choice("abcd") + str(rng.randrange(20)) for _ in range(rng.randrange(0, 3)))}
             for k in range(30)]
    items = [{"c": f"c{k % 7}", "tags": tuple(f"g{rng.randrange(15)}" for _ in range(rng.randrange(0, 4)))}
             for k in range(40)]
    blocks = FeatureBlocks()
    warm = FeatureHasher(bits=20, block_slots=block_slots, max_cache=max_cache)
    for b in range(25):
        raws = []
        for j in range(rng.randrange(1, 80)):
            u, i = rng.randrange(len(users)), rng.randrange(len(items))
            raws.append(encode_event(Event(kind="impression", event_id=f"e{b}-{j}", event_time=1.0, user_id=f"u{u}",
                                           request_id="r", user_features=users[u], item_id=f"i{i}",
                                           item_features=items[i], label=j % 2, position=j % 4)))
        cols = decode_columns(raws, blocks)[0]
        assert (cols.user_block >= 0).all()
        got = warm.transform_columns(cols)
        assert _same(got, FeatureHasher(bits=20).transform(columns_to_xs(cols)))


def test_rows_the_validator_built_hash_by_value_beside_interned_rows() -> None:
    """A row whose mapping is not interned (msgspec refuses a boolean feature, the validator
    accepts it: block id NO_BLOCK) in a batch of interned rows with the same names is hashed
    from its own values, whatever the table holds."""
    from learners.base import columns_to_xs
    from streams.columns import NO_BLOCK, FeatureBlocks, decode_columns
    from streams.events import Event, encode_event

    def raw(j: int, flag: object) -> bytes:
        e = Event(kind="impression", event_id=f"e{j}", event_time=1.0, user_id=f"u{j % 3}", request_id="r",
                  user_features={"a": f"x{j % 2}", "flag": "no"}, item_id=f"i{j % 4}",
                  item_features={"c": "c1"}, label=j % 2, position=j % 3)
        return encode_event(e).replace(b'"flag":"no"', b'"flag":' + flag) if flag != b'"no"' else encode_event(e)

    warm = FeatureHasher(bits=20, block_slots=4)
    blocks = FeatureBlocks()
    for b in range(6):
        raws = [raw(j, b"true" if (j + b) % 5 == 0 else b"1" if (j + b) % 7 == 0 else b'"no"') for j in range(30)]
        cols, rejects = decode_columns(raws, blocks)
        assert not rejects and (cols.user_block == NO_BLOCK).any() and (cols.user_block != NO_BLOCK).any()
        assert _same(warm.transform_columns(cols), FeatureHasher(bits=20).transform(columns_to_xs(cols)))
