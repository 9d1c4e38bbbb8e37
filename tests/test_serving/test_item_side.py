"""The precomputed item half of pre-ranking (``ItemSideCache``) changes no answer.

Real two-tower, IntTower (FE-block heads) and DAT learners trained briefly on simulated
impressions, a real flat FAISS index of their item vectors: a scorer that pre-ranks from
the cache and one that encodes every candidate's feature dict give the same rankings and
the same scores (up to float rounding of batched matmuls), also after an item's features
change and after a new model is loaded.
"""

from __future__ import annotations

import numpy as np
import pytest

from indexer.build import BuildConfig, build_index
from indexer.handle import IndexHandle, IndexHolder
from learners.base import event_to_x
from learners.registry import make_learner
from serving.scorer import ItemFeatureStore, ModelHandle, Scorer, ScoreRequest
from streams.simulator import ClickSimulator, SimulatorConfig

SIM = SimulatorConfig(seed=3, n_users=120, n_items=200, slate_size=5, drift_every=None)


class Source:
    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle

    def current(self) -> ModelHandle:
        return self.handle


def _trained(name: str, **params):
    events = list(ClickSimulator(SIM).events(max_events=2500))
    imps = [e for e in events if e.kind == "impression"]
    learner = make_learner(name, out_dim=8, hidden=(16,), field_dim=4, seed=0, **params)
    for start in range(0, len(imps), 200):
        batch = imps[start:start + 200]
        learner.learn_many([event_to_x(e) for e in batch], np.array([e.label for e in batch]))
    store = ItemFeatureStore()
    for e in events:
        store.observe_event(e)
    return learner, store, events


def _holder(learner, store: ItemFeatureStore) -> IndexHolder:
    ids = np.array(sorted(store._xs))
    vecs = learner.encode_items([store._xs[i] for i in ids])
    built = build_index(vecs, BuildConfig(kind="flat", recall_k=10))
    return IndexHolder(IndexHandle(built.index, ids, 1, {}))


def _requests(events, n: int = 24) -> list[ScoreRequest]:
    reqs = [e for e in events if e.kind == "request"][:n]
    return [ScoreRequest(request_id=e.request_id, user_id=e.user_id, user_features=e.user_features, k=10)
            for e in reqs]


def _same(a, b) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        sa = np.array([i.score for i in ra.items])
        sb = np.array([i.score for i in rb.items])
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-7)
        # same items in the same order, except where two scores tie within rounding
        for x, y, s in zip(ra.items, rb.items, sa):
            if x.item_id != y.item_id:
                assert np.isclose(s, [i.score for i in rb.items if i.item_id == x.item_id][0], atol=1e-6)


@pytest.mark.parametrize("name, params", [("two-tower", {}), ("inttower", {}), ("dat", {}),
                                          ("two-tower", {"item_bias": True})])
def test_cached_item_side_gives_the_same_rankings(name, params):
    learner, store, events = _trained(name, **params)
    holder = _holder(learner, store)
    source = Source(ModelHandle(learner=learner, name=name, version=1))
    cached = Scorer(source, holder, k_retrieve=50, item_xs=store)
    plain = Scorer(source, holder, k_retrieve=50, item_xs=store, item_side_cache=False)
    reqs = _requests(events)
    first = cached.score_many(reqs)
    _same(first, plain.score_many(reqs))
    assert len(cached.item_sides) > 0
    filled = len(cached.item_sides)
    _same(cached.score_many(reqs), first)  # from the cache now: nothing recomputed
    assert len(cached.item_sides) == filled

    # an item's features change: its row is recomputed, the answers follow
    top = first[0].items[0].item_id
    feats = {k[2:]: v for k, v in store._xs[top].items() if k.startswith("i:")}
    store.upsert(top, {**feats, "category": "a-category-never-seen"})
    _same(cached.score_many(reqs), plain.score_many(reqs))
    assert len(cached.item_sides) == filled + 1

    # a new model (another learner object): a fresh cache
    other, _, _ = _trained(name, **params)
    other.learn_many([store._xs[top] | {"user_id": "u1"}], np.array([1]))
    source.handle = ModelHandle(learner=other, name=name, version=2)
    _same(cached.score_many(reqs), plain.score_many(reqs))


def test_same_features_again_keep_the_cached_row():
    store = ItemFeatureStore()
    store.upsert("i1", {"category": "c1"})
    r = store.revision("i1")
    store.upsert("i1", {"category": "c1"})
    assert store.revision("i1") == r
    store.upsert("i1", {"category": "c2"})
    assert store.revision("i1") == r + 1


def test_a_prepared_model_serves_its_first_requests_from_a_warm_cache():
    """Scorer.prepare (CheckpointLearnerSource's prepare hook) fills a new model's item side
    for every known item before it serves: its first requests compute no item tower, their
    answers equal the uncached scorer's, and a request still on the previous model finds
    that model's rows (the two newest models' tables are kept)."""
    learner, store, events = _trained("inttower")
    holder = _holder(learner, store)
    source = Source(ModelHandle(learner=learner, name="inttower", version=1))
    cached = Scorer(source, holder, k_retrieve=50, item_xs=store)
    plain = Scorer(source, holder, k_retrieve=50, item_xs=store, item_side_cache=False)
    reqs = _requests(events)
    other, _, _ = _trained("inttower")
    other.learn_many([store._xs[i] | {"user_id": "u1"} for i in store.ids()[:20]], np.ones(20))
    old, new = ModelHandle(learner=learner, name="inttower", version=1), ModelHandle(learner=other, name="inttower",
                                                                                     version=2)
    expected = {}
    for handle in (old, new):  # the uncached answers (score_candidates runs item_side itself)
        source.handle = handle
        expected[handle.version] = plain.score_many(reqs)
    source.handle = old
    assert cached.prepare(old) == len(store)
    calls: list[int] = []
    original = type(learner).item_side

    def counting(self, xs):
        calls.append(len(xs))
        return original(self, xs)

    type(learner).item_side = counting
    try:
        _same(cached.score_many(reqs), expected[1])
        assert calls == []  # every candidate's row was there
        assert cached.prepare(new) == len(store) and calls == [len(store)]
        source.handle = new
        _same(cached.score_many(reqs), expected[2])
        source.handle = old  # a straggler still on the previous model
        _same(cached.score_many(reqs), expected[1])
        assert calls == [len(store)]  # neither model recomputed a row
    finally:
        type(learner).item_side = original
    # a learner without an item side has nothing to prepare
    assert cached.prepare(ModelHandle(learner=make_learner("ctr"), name="ctr", version=3)) == 0
