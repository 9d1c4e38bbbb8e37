"""Two-tower learners: blocks, towers, switches, checkpoints, new ids mid-stream."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from learners.checks import toy_stream
from learners.two_tower import make
from learners.two_tower.blocks import MLP, FEProjection, LightSE, fe_score, fe_score_matrix
from learners.two_tower.features import EmbeddingStore, FeatureEncoder
from learners.two_tower.model import ModelConfig, TwoTowerModel

torch.set_num_threads(1)

SMALL = dict(field_dim=4, hidden=(16,), out_dim=8, seed=3)
NAMES = ("two-tower", "inttower", "dat")


def _xy(n: int, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    xy = toy_stream(n, seed=seed)
    return [x for x, _ in xy], np.array([y for _, y in xy], dtype=np.float64)


def _trained(name: str, n: int = 512, **params):
    learner = make(name, **{**SMALL, **params})
    xs, ys = _xy(n)
    for lo in range(0, n, 64):
        learner.learn_many(xs[lo: lo + 64], ys[lo: lo + 64])
    return learner


# ---------------------------------------------------------------- blocks: shapes, gradients
def _grads_flow(module: torch.nn.Module, out: torch.Tensor, inp: torch.Tensor) -> None:
    out.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert inp.grad is not None and inp.grad.abs().sum() > 0


def test_mlp_shapes_layers_and_gradients():
    mlp = MLP(6, (5, 4), 3)
    x = torch.randn(7, 6, requires_grad=True)
    out, layers = mlp.forward_layers(x)
    assert out.shape == (7, 3)
    assert [t.shape[1] for t in layers] == [6, 5, 4]
    assert torch.equal(mlp(x), out)
    _grads_flow(mlp, out, x)


def test_lightse_is_a_softmax_reweighting_with_residual():
    se = LightSE(3)
    emb = torch.randn(4, 3, 5, requires_grad=True)
    out = se(emb)
    assert out.shape == (4, 3, 5)
    w = se.weights(emb)
    assert torch.allclose(w.sum(dim=1), torch.ones(4))
    # by hand: A = softmax(W mean_e(E) + b); E + E * A
    z = emb.detach().mean(dim=-1) @ se.fc.weight.detach().T + se.fc.bias.detach()
    a = torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True)
    assert torch.allclose(out.detach(), emb.detach() * (1 + a[..., None]), atol=1e-6)
    _grads_flow(se, out, emb)


def test_fe_projection_unit_heads_and_gradients():
    proj = FEProjection([6, 4], heads=3, head_dim=2)
    a, b = torch.randn(5, 6, requires_grad=True), torch.randn(5, 4)
    heads = proj([a, b])
    assert heads.shape == (5, 6, 2)
    assert torch.allclose(heads.norm(dim=-1), torch.ones(5, 6), atol=1e-6)
    _grads_flow(proj, heads, a)


def test_fe_score_is_sum_over_user_heads_of_max_over_item_heads():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(3, 4, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    expected = torch.tensor([sum(max(float(u[b, h] @ v[b, k]) for k in range(2)) for h in range(4)) for b in range(3)])
    assert torch.allclose(fe_score(u, v), expected, atol=1e-5)
    m = fe_score_matrix(u, v)
    assert m.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            want = sum(max(float(u[i, h] @ v[j, k]) for k in range(2)) for h in range(4))
            assert abs(float(m[i, j]) - want) < 1e-5
    one = v[:, :1]
    assert torch.allclose(fe_score_matrix(u, one), u.sum(dim=1) @ one[:, 0].T, atol=1e-5)


@pytest.mark.parametrize("switches", [{}, {"lightse": True, "fe": True}, {"dat": True}, {"fe": True, "fe_item_heads": 2}])
def test_model_shapes_and_every_parameter_gets_gradient(switches):
    gen = torch.Generator().manual_seed(0)
    store = EmbeddingStore(4, gen)
    enc = FeatureEncoder(store, ("user_id", "u:age"), ("item_id", "i:tags"))
    xs = [{"user_id": f"u{i}", "u:age": i % 3, "item_id": f"i{i}", "i:tags": ("a", "b")[: i % 3]} for i in range(6)]
    batch = enc.encode(xs, xs, insert=True)
    model = TwoTowerModel(ModelConfig(2, 2, field_dim=4, hidden=(8,), out_dim=6, n_positions=4, **switches))
    emb = store.gather(batch.rows, requires_grad=True)
    aug = (torch.randn(6, 6, requires_grad=True), torch.randn(6, 6, requires_grad=True)) if switches.get("dat") else (None, None)
    u, v = model(batch.user, batch.item, emb, *aug)
    assert u.vec.shape == v.vec.shape == (6, 6)
    assert torch.allclose(u.vec.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(v.vec.norm(dim=-1), torch.ones(6), atol=1e-5)
    logit = model.logit(u, v, torch.tensor([0, 1, 2, 3, -1, 0]))
    assert logit.shape == (6,)
    (logit.sum() + model.similarity_matrix(u, v).sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    if switches.get("dat"):
        assert aug[0].grad.abs().sum() > 0 and aug[1].grad.abs().sum() > 0


# ---------------------------------------------------------------- towers
@pytest.mark.parametrize("name", NAMES)
def test_item_tower_alone_reproduces_the_full_models_item_vectors(name):
    learner = _trained(name)
    xs, _ = _xy(40, seed=9)
    enc = learner.encoder.encode(xs, xs, insert=False)
    with torch.no_grad():
        emb = learner.store.gather(enc.rows, requires_grad=False)
        ua = learner._id_vectors(learner.aug_store, enc.user_keys, "a_u", False)[0] if learner.dat else None
        ia = learner._id_vectors(learner.aug_store, enc.item_keys, "a_v", False)[0] if learner.dat else None
        _, v = learner.model(enc.user, enc.item, emb, ua, ia)
    alone = learner.encode_items([learner.item_features_of(x) for x in xs])
    assert alone.dtype == np.float32 and alone.shape == (40, SMALL["out_dim"])
    assert np.allclose(alone, v.vec.numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)
    # the indexer's path: a learner rebuilt from a pickled state, item side only
    restored = make(name, **SMALL)
    restored.load_state_dict(pickle.loads(pickle.dumps(learner.state_dict())))
    assert np.array_equal(restored.encode_items([learner.item_features_of(x) for x in xs]), alone)


@pytest.mark.parametrize("name", NAMES)
def test_user_item_dot_product_ranks_like_the_model(name):
    learner = _trained(name, **({"fe_item_heads": 1} if name == "inttower" else {}))
    xs, _ = _xy(30, seed=10)
    user = {"user_id": "u1", "u:age": "25-34", "u:gender": "M"}
    items = [learner.item_features_of(x) for x in xs]
    dots = learner.encode_users([user]) @ learner.encode_items(items).T
    probs = learner.score_candidates(user, items)
    assert np.array_equal(np.argsort(-dots[0], kind="stable"), np.argsort(-probs, kind="stable"))
    # the pre-ranking score is the click probability the learner predicts (no position)
    pred = learner.predict_proba_many([{**user, **it} for it in items])
    assert np.allclose(probs, pred, atol=1e-6)


def test_fe_with_several_item_heads_scores_by_max_not_by_dot():
    learner = _trained("inttower", fe_item_heads=2)
    assert learner.model.item_fe.heads == 2
    xs, _ = _xy(30, seed=11)
    user = {"user_id": "u2", "u:age": "18-24"}
    items = [learner.item_features_of(x) for x in xs]
    probs = learner.score_candidates(user, items)
    pred = learner.predict_proba_many([{**user, **it} for it in items])
    assert np.allclose(probs, pred, atol=1e-6)
    u = learner._tower([user], "user")
    v = learner._tower(items, "item")
    exact = fe_score(u.heads.expand(len(items), -1, -1), v.heads)
    assert np.allclose(np.argsort(-exact.detach().numpy(), kind="stable"), np.argsort(-probs, kind="stable"))


# ---------------------------------------------------------------- switches
def _after_learning(**params) -> tuple[np.ndarray, dict]:
    learner = make("two-tower", **{**SMALL, **params})
    xs, ys = _xy(256, seed=12)
    before = learner.predict_proba_many(xs[:50])
    learner.learn_many(xs, ys)
    return before, learner.predict_proba_many(xs[:50]), learner.last_loss


@pytest.mark.parametrize("switch", ["lightse", "fe", "dat"])
def test_architecture_switches_change_the_output(switch):
    base_before, base_after, _ = _after_learning()
    on_before, on_after, _ = _after_learning(**{switch: True})
    assert not np.allclose(base_before, on_before)
    assert not np.allclose(base_after, on_after)


@pytest.mark.parametrize("switch, term", [("cir", "cir"), ("dat", "mimic")])
def test_loss_switches_add_their_term_and_change_the_update(switch, term):
    off_before, off_after, off_loss = _after_learning()
    on_before, on_after, on_loss = _after_learning(**{switch: True})
    assert term not in off_loss and on_loss[term] > 0
    if switch == "cir":  # CIR only adds a loss: same start, different update
        assert np.array_equal(on_before, off_before)
    assert not np.allclose(off_after, on_after)


def test_category_alignment_and_softmax_terms_are_used_when_asked():
    _, _, loss = _after_learning(dat=True, category_field="i:category", loss="both", random_negatives=8)
    assert {"bce", "softmax", "mimic", "category"} <= set(loss)
    _, _, loss = _after_learning(loss="softmax")
    assert set(loss) == {"softmax"}


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="loss"):
        make("two-tower", loss="hinge")
    with pytest.raises(ValueError, match="fe_item_heads"):
        make("inttower", out_dim=10, fe_item_heads=3).predict_proba_many(_xy(2)[0])


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name, extra", [("two-tower", {"loss": "both", "random_negatives": 4}), ("inttower", {}),
                                         ("dat", {"category_field": "i:category"})])
def test_checkpoint_round_trip_same_predictions_and_same_next_update(name, extra):
    a = _trained(name, **extra)
    b = make(name, **{**SMALL, **extra})
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    probe, _ = _xy(60, seed=13)
    assert np.array_equal(a.predict_proba_many(probe), b.predict_proba_many(probe))
    xs, ys = _xy(128, seed=14)
    xs = xs + [{"user_id": "brand-new", "item_id": "fresh", "i:category": "c9"}]
    ys = np.append(ys, 1.0)
    a.learn_many(xs, ys)
    b.learn_many(xs, ys)
    assert np.array_equal(a.predict_proba_many(probe), b.predict_proba_many(probe))
    assert np.array_equal(a.store.weight, b.store.weight)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_file_restores_through_the_registry(tmp_path):
    from learners.checkpoint import load_checkpoint, restore_learner, save_checkpoint

    a = _trained("inttower")
    save_checkpoint(tmp_path / "tt.ckpt", a, {"impressions": {0: 512}}, a.n_learned)
    b = restore_learner(load_checkpoint(tmp_path / "tt.ckpt"))
    probe, _ = _xy(30, seed=15)
    assert b.spec == a.spec
    assert np.array_equal(a.encode_items(probe), b.encode_items(probe))
    assert np.array_equal(a.predict_proba_many(probe), b.predict_proba_many(probe))


def test_state_dict_is_a_copy():
    a = _trained("two-tower")
    state = a.state_dict()
    frozen = state["store"]["weight"].clone()
    xs, ys = _xy(64, seed=16)
    a.learn_many(xs, ys)
    assert torch.equal(state["store"]["weight"], frozen)


# ---------------------------------------------------------------- new ids, growth, expiry
@pytest.mark.parametrize("name", NAMES)
def test_a_new_user_and_item_mid_stream_are_learned_without_restart(name):
    learner = _trained(name)
    new = {"user_id": "newcomer", "u:age": "25-34", "item_id": "launch", "i:category": "c-new", "i:tags": ("t-new",)}
    assert "launch" not in learner.store.table("item_id")
    p0 = learner.predict_proba_one(new)
    xs, ys = _xy(63, seed=17)
    for _ in range(8):
        learner.learn_many(xs + [new], np.append(ys, 1.0))
    assert "launch" in learner.store.table("item_id") and "newcomer" in learner.store.table("user_id")
    row = learner.store.table("item_id")["launch"]
    assert learner.store.weight[row].abs().sum() > 0
    assert learner.predict_proba_one(new) > p0 + 0.1


def test_unknown_ids_at_prediction_never_grow_the_tables():
    learner = _trained("two-tower")
    size = len(learner.store)
    learner.predict_proba_many([{"user_id": "ghost", "item_id": "ghost-item", "i:tags": ("z",)}])
    learner.encode_items([{"item_id": "other-ghost"}])
    assert len(learner.store) == size


def test_tables_grow_past_their_initial_size_and_old_rows_survive():
    learner = make("two-tower", initial_rows=8, **SMALL)
    xs, ys = _xy(64, seed=18)
    learner.learn_many(xs, ys)
    assert learner.store.capacity > 8
    keys = dict(learner.store.table("item_id"))
    before = learner.predict_proba_many(xs)
    more = [{"user_id": f"x{i}", "item_id": f"y{i}"} for i in range(200)]
    learner.learn_many(more, np.zeros(200))
    assert all(learner.store.table("item_id")[k] == r for k, r in keys.items())
    assert learner.store.capacity >= len(learner.store) >= 400
    assert before.shape == learner.predict_proba_many(xs).shape


def test_ids_unseen_for_long_expire_and_their_rows_are_reused():
    learner = make("two-tower", expire_after=3, expire_every=1, **SMALL)
    learner.learn_many([{"user_id": "old", "item_id": "old-item"}], [1])
    rows_old = {learner.store.table("user_id")["old"], learner.store.table("item_id")["old-item"]}
    for i in range(5):
        learner.learn_many([{"user_id": f"u{i}", "item_id": f"i{i}"}], [0])
    assert "old" not in learner.store.table("user_id") and "old-item" not in learner.store.table("item_id")
    assert learner.store.expired >= 2
    in_use = set(learner.store.table("user_id").values()) | set(learner.store.table("item_id").values())
    assert rows_old & in_use  # freed rows were handed out again
    # an expired id comes back as a new id: learned again, no error
    learner.learn_many([{"user_id": "old", "item_id": "old-item"}], [1])
    assert "old" in learner.store.table("user_id")


def test_full_table_evicts_the_least_recently_seen():
    gen = torch.Generator().manual_seed(0)
    store = EmbeddingStore(2, gen, initial_rows=4, max_rows=4)
    enc = FeatureEncoder(store, ("user_id",), ("item_id",))
    for step, k in enumerate(["a", "b", "c", "d"], start=1):
        enc.encode([{"user_id": k}], None, insert=True, step=step)
    enc.encode([{"user_id": "e"}], None, insert=True, step=5)
    assert "a" not in store.table("user_id") and {"b", "c", "d", "e"} <= set(store.table("user_id"))
    assert store.evicted == 1 and store.capacity == 4


def test_numbers_and_multi_valued_features_become_bags():
    gen = torch.Generator().manual_seed(0)
    store = EmbeddingStore(3, gen)
    enc = FeatureEncoder(store, ("user_id", "u:age"), ("item_id", "i:tags"))
    xs = [{"user_id": "u", "u:age": 30.0, "item_id": "i", "i:tags": ("a", "b", "a")},
          {"user_id": "u", "u:age": 30, "item_id": "j"}]
    batch = enc.encode(xs, xs, insert=True)
    assert store.table("u:age") == {30: store.table("u:age")[30]}  # 30.0 and 30: one category
    # item bags, field-major: item_id of both, then tags of both (3 rows, then empty)
    assert batch.item.offsets.tolist() == [0, 1, 2, 5]
    assert len(batch.item.inverse) == 5


def test_examples_that_are_not_plain_dicts_encode_the_same():
    from types import MappingProxyType

    learner = _trained("dat")
    xs, _ = _xy(20, seed=19)
    proxies = [MappingProxyType(x) for x in xs]
    assert np.array_equal(learner.predict_proba_many(proxies), learner.predict_proba_many(xs))
    assert np.array_equal(learner.encode_items(proxies), learner.encode_items(xs))
