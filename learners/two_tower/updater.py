"""The streaming two-tower learner: optimizer, micro-batching and the clock around the model.

It speaks the learner protocol of :mod:`learners.base` (``predict_proba_many`` then
``learn_many`` on each micro-batch of the stream) plus the two-tower extras
(``encode_items``, ``encode_users``, ``item_features_of``, ``score_candidates``).

Updates are sparse: per batch the unique embedding rows of both towers are gathered into
one small leaf tensor, the backward pass gives its (U, e) gradient, and a sparse Adagrad
writes it back (:meth:`EmbeddingStore.adagrad_`, per-example gradients, accumulators
starting at ``adagrad_init``) - no full-table gradient, no ``torch.sparse`` coalescing;
the dense layers use (fused) Adam. Prediction and the towers alone read the table in
place, without de-duplication or copies. The clock is the learner's own
step counter (one per micro-batch): it drives row expiry and the item-frequency estimate,
so a replay of the same events gives the same model. Everything that learning depends on
(dense weights, Adam state, id tables, embedding rows and their Adagrad state, the
frequency estimate, the random-negative buffer and RNG states, the step) is in
``state_dict``: a restored learner makes the identical next update.

>>> lrn = TwoTowerLearner(seed=1, hidden=(16,), out_dim=8, field_dim=4)
>>> xs = [{"user_id": "u1", "item_id": "i1"}, {"user_id": "u2", "item_id": "i2"}]
>>> lrn.predict_proba_many(xs).shape
(2,)
>>> lrn.learn_many(xs, [1, 0]); lrn.encode_items(xs).shape
(2, 8)
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from learners.base import CTX_PREFIX, ITEM_PREFIX, X, field_values
from learners.two_tower import losses
from learners.two_tower.features import EmbeddingStore, FeatureEncoder, _plain, _values, feature_key, infer_fields
from learners.two_tower.model import ModelConfig, TowerOutput, TwoTowerModel

__all__ = ["TwoTowerLearner", "ItemSide", "LossName", "PRESETS", "make", "two_tower", "inttower", "dat"]

logger = logging.getLogger(__name__)

LossName = Literal["bce", "softmax", "both"]

#: Switches that the registered names turn on (any can be overridden by a parameter).
PRESETS: dict[str, dict[str, Any]] = {
    "two-tower": {},
    "inttower": {"lightse": True, "fe": True, "cir": True, "init_scale": 10.0},
    "dat": {"dat": True},
}

_POSITION = CTX_PREFIX + "position"
#: Items per item-tower call at inference (``encode_items``, ``encode_item_columns``).
INFERENCE_CHUNK = 2048
_STATE_VERSION = 1


@dataclass(frozen=True)
class ItemSide:
    """Precomputed item half of pre-ranking (:meth:`TwoTowerLearner.item_side`): rows of the
    item tower's output (``vec`` (N, D), FE-block ``heads`` (N, H, D) or None) and the item
    bias (N,) or None."""

    vec: torch.Tensor
    heads: torch.Tensor | None
    bias: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.vec.shape[0])


@dataclass
class _Pass:
    """One forward pass: the encoded batch, tower outputs, per-id vectors (DAT ``a_u``,
    ``a_v``; item bias (B,)), and the (store, rows, leaf) triples to update sparsely."""

    enc: Any
    u: TowerOutput
    v: TowerOutput
    user_aug: torch.Tensor | None
    item_aug: torch.Tensor | None
    item_bias: torch.Tensor | None
    sparse: list


def _take(out: TowerOutput, idx: torch.Tensor) -> TowerOutput:
    return TowerOutput(out.vec[idx], None if out.heads is None else out.heads[idx])


def _split(out: TowerOutput, n: int) -> tuple[TowerOutput, TowerOutput]:
    head = TowerOutput(out.vec[:n], None if out.heads is None else out.heads[:n])
    tail = TowerOutput(out.vec[n:], None if out.heads is None else out.heads[n:])
    return head, tail


class TwoTowerLearner:
    """Two-tower / IntTower / DAT learner on a click stream.

    Parameters
    ----------
    name
        Registered name this learner was built under (``two-tower``, ``inttower``,
        ``dat``); kept in :attr:`spec`.
    seed
        Seeds weight initialisation, new embedding rows and negative sampling.
    field_dim, hidden, out_dim
        Field-embedding width, hidden layer widths of each tower's MLP, output
        dimension D of the L2-normalised vectors. The defaults (no hidden layer: each
        tower a linear map of its field embeddings, a factorisation-machine-like
        bilinear score; 32-wide field embeddings; sparse Adagrad 0.05, Adam 0.0003,
        calibration 0.1) won the prequential tuning on the simulator stream
        (``towerstream train --dataset simulator``, seeds 0-2, 167k impressions,
        batches of 256 and 1024): hidden layers of 32-128 units learned more slowly
        there (AUC 0.003-0.01 lower) and cost more per event; the earlier rates (0.2 /
        0.001) were 0.001-0.009 lower; a per-item bias added 0.0004 (so it stays off:
        without it retrieval ranks exactly as the model).
    lightse, fe, cir
        IntTower's Light-SE, FE-block and CIR switches. ``fe_user_heads`` heads per
        user layer, ``fe_item_heads`` item heads (1 keeps retrieval an exact dot product).
    dat
        DAT augmented vectors with the adaptive-mimic loss (weight ``mimic_weight``);
        ``category_field`` (e.g. ``"i:category"``) turns on category alignment with
        weight ``category_weight``.
    loss
        ``"bce"`` on impression labels, ``"softmax"`` (in-batch sampled softmax over
        clicked pairs with logQ correction), or ``"both"``, weighted by ``bce_weight``
        and ``softmax_weight``; ``random_negatives`` adds that many uniformly drawn recent
        items as extra softmax negatives.
    cir_weight, cir_tau
        Weight and temperature of the CIR InfoNCE term (0.02: on the simulator stream
        0.1 cost 0.003-0.008 AUC against 0.02, seeds 0-2).
    lr_sparse, adagrad_init, lr_dense, lr_bias
        Adagrad rate of the embedding rows (on per-example gradients) and the starting
        value of each row's accumulator, Adam rate of the dense layers, and Adam rate
        of the calibration parameters (score scale, bias, position bias), which must
        move far in few steps.
    batch_size
        ``learn_many`` splits larger inputs into micro-batches of this size (``None``: as given).
    initial_rows, max_rows, expire_after, expire_every
        Id-table capacity, its growth cap, the age in steps after which unseen ids are
        freed (``None``: never) and how often (in steps) expiry runs.
    n_positions
        Size of the learned position bias on the click logit (0: none); used only when
        an example carries ``ctx:position``.
    item_bias
        A learned per-item-id bias on the click logit (popularity), for prediction and
        pre-ranking (``score_candidates``); retrieval (``encode_*``) stays the pure dot
        product of the normalised vectors.
    user_fields, item_fields
        Feature names of each tower (``user_id`` / ``item_id`` first). ``None``: taken
        from the first batch (later unknown fields are ignored).
    """

    def __init__(
        self,
        *,
        name: str = "two-tower",
        seed: int = 0,
        field_dim: int = 32,
        hidden: Sequence[int] = (),
        out_dim: int = 64,
        lightse: bool = False,
        fe: bool = False,
        fe_user_heads: int = 1,
        fe_item_heads: int = 1,
        cir: bool = False,
        cir_weight: float = 0.02,
        cir_tau: float = 0.1,
        dat: bool = False,
        mimic_weight: float = 0.5,
        category_field: str | None = None,
        category_weight: float = 0.1,
        loss: LossName = "bce",
        bce_weight: float = 1.0,
        softmax_weight: float = 1.0,
        random_negatives: int = 0,
        negative_buffer: int = 4096,
        lr_sparse: float = 0.05,
        adagrad_init: float = 1.0,
        lr_dense: float = 0.0003,
        lr_bias: float = 0.1,
        batch_size: int | None = None,
        initial_rows: int = 4096,
        max_rows: int = 1 << 22,
        expire_after: int | None = None,
        expire_every: int = 1000,
        n_positions: int = 64,
        item_bias: bool = False,
        init_scale: float = 5.0,
        init_std: float = 0.05,
        freq_buckets: int = 1 << 18,
        user_fields: Sequence[str] | None = None,
        item_fields: Sequence[str] | None = None,
    ) -> None:
        if loss not in ("bce", "softmax", "both"):
            raise ValueError(f"loss must be 'bce', 'softmax' or 'both', got {loss!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.name = name
        self.seed = seed
        self.field_dim = field_dim
        self.hidden = tuple(int(h) for h in hidden)
        self.out_dim = out_dim
        self.lightse = lightse
        self.fe = fe
        self.fe_user_heads = fe_user_heads
        self.fe_item_heads = fe_item_heads
        self.cir = cir
        self.cir_weight = cir_weight
        self.cir_tau = cir_tau
        self.dat = dat
        self.mimic_weight = mimic_weight
        self.category_field = category_field
        self.category_weight = category_weight
        self.loss = loss
        self.bce_weight = bce_weight
        self.softmax_weight = softmax_weight
        self.random_negatives = random_negatives
        self.negative_buffer = negative_buffer
        self.lr_sparse = lr_sparse
        self.adagrad_init = adagrad_init
        self.lr_dense = lr_dense
        self.lr_bias = lr_bias
        self.batch_size = batch_size
        self.initial_rows = initial_rows
        self.max_rows = max_rows
        self.expire_after = expire_after
        self.expire_every = expire_every
        self.n_positions = n_positions
        self.item_bias = item_bias
        self.init_scale = init_scale
        self.init_std = init_std
        self.freq_buckets = freq_buckets
        self.user_fields = None if user_fields is None else tuple(user_fields)
        self.item_fields = None if item_fields is None else tuple(item_fields)

        self.step = 0
        self.n_learned = 0
        self.last_loss: dict[str, float] = {}
        self._generator = torch.Generator().manual_seed(seed)
        self._rng = np.random.default_rng(seed)
        self.store = EmbeddingStore(field_dim, self._generator, initial_rows=initial_rows, max_rows=max_rows,
                                    expire_after=expire_after, init_std=init_std, init_accum=adagrad_init)
        self.aug_store = (EmbeddingStore(out_dim, self._generator, initial_rows=initial_rows, max_rows=max_rows,
                                         expire_after=expire_after, init_std=init_std, init_accum=adagrad_init)
                          if dat else None)
        self.bias_store = (EmbeddingStore(1, self._generator, initial_rows=initial_rows, max_rows=max_rows,
                                          expire_after=expire_after, init_std=0.0, init_accum=adagrad_init)
                           if item_bias else None)
        self.freq = losses.FrequencyEstimator(buckets=freq_buckets)
        self._negatives: dict[Any, dict[str, Any]] = {}
        self.encoder: FeatureEncoder | None = None
        self.model: TwoTowerModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if self.user_fields is not None and self.item_fields is not None:
            self._build(self.user_fields, self.item_fields)

    # ------------------------------------------------------------------ construction
    @property
    def spec(self) -> dict[str, Any]:
        """``{"name", "params"}``: ``make_learner(name, **params)`` rebuilds this learner."""
        params = {k: getattr(self, k) for k in (
            "seed", "field_dim", "hidden", "out_dim", "lightse", "fe", "fe_user_heads", "fe_item_heads", "cir",
            "cir_weight", "cir_tau", "dat", "mimic_weight", "category_field", "category_weight", "loss",
            "bce_weight", "softmax_weight", "random_negatives", "negative_buffer", "lr_sparse", "adagrad_init", "lr_dense", "lr_bias",
            "batch_size", "initial_rows", "max_rows", "expire_after", "expire_every", "n_positions", "item_bias", "init_scale",
            "init_std", "freq_buckets", "user_fields", "item_fields")}
        return {"name": self.name, "params": params}

    def __repr__(self) -> str:
        on = [k for k in ("lightse", "fe", "cir", "dat") if getattr(self, k)]
        return f"TwoTowerLearner(name={self.name!r}, loss={self.loss!r}, switches={on}, out_dim={self.out_dim})"

    def _build(self, user_fields: Sequence[str], item_fields: Sequence[str]) -> None:
        self.user_fields, self.item_fields = tuple(user_fields), tuple(item_fields)
        self.encoder = FeatureEncoder(self.store, self.user_fields, self.item_fields)
        config = ModelConfig(
            n_user_fields=len(self.user_fields), n_item_fields=len(self.item_fields), field_dim=self.field_dim,
            hidden=self.hidden, out_dim=self.out_dim, lightse=self.lightse, fe=self.fe,
            fe_user_heads=self.fe_user_heads, fe_item_heads=self.fe_item_heads, dat=self.dat,
            n_positions=self.n_positions, init_scale=self.init_scale,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = TwoTowerModel(config)
        calib = [self.model.bias]
        if self.model.position_bias is not None:
            calib.append(self.model.position_bias.weight)
        ids = {id(p) for p in calib}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        self.optimizer = torch.optim.Adam([{"params": rest}, {"params": calib, "lr": self.lr_bias}], lr=self.lr_dense,
                                          fused=True)

    def _ensure_built(self, xs: Sequence[X]) -> None:
        if self.model is None:
            user, item = infer_fields(xs)
            self._build(self.user_fields or user, self.item_fields or item)
            logger.info("two-tower %s fields: user %s, item %s", self.name, self.user_fields, self.item_fields)

    # ------------------------------------------------------------------ forward helpers
    def _id_vectors(self, store: EmbeddingStore, keys: Sequence[Any], field: str, insert: bool):
        """Per-id vectors (B, dim) of ``keys`` from ``store`` (zeros for unknown ids), plus
        the unique rows and their leaf tensor (for the sparse update)."""
        rows = self._id_rows(store, keys, field)
        if insert:
            table = store.table(field)
            for i in np.flatnonzero(rows < 0).tolist():
                k = keys[i]
                if k is not None:
                    r = table.get(k)  # an id twice in the batch is allocated once
                    rows[i] = r if r is not None else store.allocate(field, k)
        store.init_pending(self.step)
        known = rows >= 0
        uniq, inv = np.unique(rows[known], return_inverse=True)
        if insert:
            store.touch(uniq, self.step)
        urows = torch.from_numpy(uniq)
        leaf = store.gather(urows, requires_grad=insert)
        out = torch.zeros(len(keys), store.dim)
        if known.any():
            out = out.index_put((torch.from_numpy(np.flatnonzero(known)),), leaf[torch.from_numpy(inv.reshape(-1))])
        return out, urows, leaf

    def _forward(self, xs: Sequence[X], insert: bool, extra_items: Sequence[X] = ()) -> _Pass:
        """Both towers over ``xs`` (items: ``xs`` then ``extra_items``, the random negatives)."""
        items = list(xs) + list(extra_items) if extra_items else xs
        enc = self.encoder.encode(xs, items, insert=insert, step=self.step, unique=insert)
        emb = self.store.gather(enc.rows, requires_grad=True) if insert else self.store.weight
        sparse = [(self.store, enc.rows, emb)] if insert else []
        ua = ia = ib = None
        if self.dat:
            ua, urows, uleaf = self._id_vectors(self.aug_store, enc.user_keys, "a_u", insert)
            ia, irows, ileaf = self._id_vectors(self.aug_store, enc.item_keys, "a_v", insert)
            sparse += [(self.aug_store, urows, uleaf), (self.aug_store, irows, ileaf)]
        if self.item_bias:
            ib, brows, bleaf = self._id_vectors(self.bias_store, enc.item_keys[: len(xs)], "b_v", insert)
            ib = ib[:, 0]
            sparse.append((self.bias_store, brows, bleaf))
        u, v = self.model(enc.user, enc.item, emb, ua, ia)
        return _Pass(enc, u, v, ua, ia, ib, sparse)

    def _logit(self, p: _Pass, u: TowerOutput, v: TowerOutput, positions: torch.Tensor | None) -> torch.Tensor:
        z = self.model.logit(u, v, positions)
        return z if p.item_bias is None else z + p.item_bias

    @staticmethod
    def _positions(xs: Sequence[X]) -> torch.Tensor:
        col = field_values(xs, _POSITION)
        try:
            pos = np.array(col, dtype=np.int64)  # fast path: every example has an integer position
        except (TypeError, ValueError):
            pos = np.array([p if type(p) is int else -1 for p in col], dtype=np.int64)
        return torch.from_numpy(np.maximum(pos, -1))

    # ------------------------------------------------------------------ protocol
    def predict_proba_many(self, xs: Sequence[X]) -> np.ndarray:
        """P(click) (B,) for each example; unknown ids count as empty (never grows tables)."""
        if len(xs) == 0:
            return np.zeros(0)
        self._ensure_built(xs)
        with torch.no_grad():
            p = self._forward(xs, insert=False)
            z = self._logit(p, p.u, p.v, self._positions(xs))
        return torch.sigmoid(z).double().numpy()

    def predict_proba_one(self, x: X) -> float:
        return float(self.predict_proba_many([x])[0])

    def learn_one(self, x: X, y: int) -> None:
        self.learn_many([x], np.array([y]))

    def learn_many(self, xs: Sequence[X], ys: Sequence[int] | np.ndarray) -> None:
        """One update per micro-batch (``batch_size``) of ``xs`` with 0/1 labels ``ys``."""
        ys = np.asarray(ys, dtype=np.float32).reshape(-1)
        if len(ys) != len(xs):
            raise ValueError(f"learn_many got {len(xs)} examples and {len(ys)} labels")
        if len(xs) == 0:
            return
        self._ensure_built(xs)
        bs = self.batch_size or len(xs)
        for lo in range(0, len(xs), bs):
            self._learn_batch(xs[lo: lo + bs], ys[lo: lo + bs])

    def _sample_negatives(self) -> list[dict[str, Any]]:
        if self.random_negatives <= 0 or not self._negatives:
            return []
        pool = list(self._negatives.values())
        idx = self._rng.integers(0, len(pool), size=self.random_negatives)
        return [pool[i] for i in idx]

    def _remember_items(self, xs: Sequence[X]) -> None:
        buf = self._negatives
        for x in xs:
            key = x.get("item_id")
            if key is None:
                continue
            if key in buf:
                buf[key] = buf.pop(key)
            else:
                buf[key] = self.item_features_of(x)
                if len(buf) > self.negative_buffer:
                    del buf[next(iter(buf))]

    def _expire(self) -> None:
        if self.expire_after is not None and self.step % self.expire_every == 0:
            n = sum(store.expire(self.step) for store in (self.store, self.aug_store, self.bias_store) if store)
            if n:
                logger.info("step %d: expired %d embedding rows unseen for %d steps", self.step, n, self.expire_after)

    def _loss_parts(self, fp: _Pass, xs: Sequence[X], ys: np.ndarray, negs: list, use_softmax: bool,
                    scale: Mapping[str, float] | None = None) -> tuple[dict[str, torch.Tensor], list]:
        """The loss terms of one forward pass over ``xs`` (B,) with labels ``ys`` (B,), each
        times ``scale[term]`` when given (a data-parallel rank's share), and the positives'
        item keys."""
        enc, u, ua, ia = fp.enc, fp.u, fp.user_aug, fp.item_aug
        b = len(xs)
        v, v_neg = _split(fp.v, b) if negs else (fp.v, None)
        if ia is not None and negs:
            ia = ia[:b]
        y = torch.from_numpy(ys)
        item_keys = enc.item_keys[:b]
        parts: dict[str, torch.Tensor] = {}
        if self.loss in ("bce", "both"):
            parts["bce"] = self.bce_weight * losses.bce(self._logit(fp, u, v, self._positions(xs)), y)
        pos = torch.from_numpy(np.flatnonzero(ys > 0))
        pos_keys = [item_keys[i] for i in pos.tolist()]
        if use_softmax and (len(pos) >= 2 or (len(pos) >= 1 and negs)):
            up, vp = _take(u, pos), _take(v, pos)
            neg_sim = neg_log_q = None
            if v_neg is not None:
                neg_sim = self.model.similarity_matrix(up, v_neg)
                neg_log_q = torch.full((len(negs),), float(np.log(len(negs) / max(len(self._negatives), 1))))
            parts["softmax"] = self.softmax_weight * losses.sampled_softmax(
                self.model.similarity_matrix(up, vp), self.model.scale, pos_keys, self.freq.log_q(pos_keys),
                neg_sim, [n.get("item_id") for n in negs] if negs else None, neg_log_q)
        if self.cir and len(pos) >= 2:
            parts["cir"] = self.cir_weight * losses.info_nce(u.vec[pos], v.vec[pos], pos_keys, self.cir_tau)
        if self.dat:
            parts["mimic"] = self.mimic_weight * (losses.mimic(ua, v.vec, y) + losses.mimic(ia, u.vec, y))
            if self.category_field is not None:
                cats = field_values(xs, self.category_field)
                cats = [feature_key(c[0] if isinstance(c, tuple) and c else c) if c is not None else None for c in cats]
                parts["category"] = self.category_weight * losses.category_alignment(v.vec, cats)
        if scale is not None:
            parts = {k: t * scale[k] for k, t in parts.items()}
        return parts, pos_keys

    def _learn_batch(self, xs: Sequence[X], ys: np.ndarray) -> None:
        self.step += 1
        self._expire()
        use_softmax = self.loss in ("softmax", "both")
        negs = self._sample_negatives() if use_softmax else []
        fp = self._forward(xs, insert=True, extra_items=negs)
        b = len(xs)
        parts, pos_keys = self._loss_parts(fp, xs, ys, negs, use_softmax)
        self.last_loss = {k: float(t.detach()) for k, t in parts.items()}
        if parts:
            self.optimizer.zero_grad(set_to_none=True)
            sum(parts.values()).backward()
            self.optimizer.step()
            for store, rows, leaf in fp.sparse:
                if leaf.grad is not None and len(rows):
                    # per-example gradients (the loss summed, not averaged, over the batch), as FTRL takes them
                    store.adagrad_(rows, leaf.grad.mul_(b), self.lr_sparse)
        if use_softmax:
            self.freq.update(pos_keys, self.step)
            if self.random_negatives > 0:
                self._remember_items(xs)
        self.n_learned += b

    # ------------------------------------------------------------------ data parallel
    def _union_rows(self, xs: Sequence[X], negs: list) -> tuple[list[tuple[EmbeddingStore, torch.Tensor]], list]:
        """Allocate and touch the rows of every id in ``xs`` (and the negatives' items) in the
        order :meth:`_forward` allocates them (store, then DAT ``a_u``, ``a_v``, then item
        bias: the same generator draws); returns each sparse entry's unique rows (U,) and
        the item keys of ``xs``."""
        items = list(xs) + list(negs) if negs else xs
        enc = self.encoder.encode(xs, items, insert=True, step=self.step, unique=True)
        out = [(self.store, enc.rows)]
        if self.dat:
            out.append((self.aug_store, self._id_vectors(self.aug_store, enc.user_keys, "a_u", True)[1]))
            out.append((self.aug_store, self._id_vectors(self.aug_store, enc.item_keys, "a_v", True)[1]))
        if self.item_bias:
            out.append((self.bias_store, self._id_vectors(self.bias_store, enc.item_keys[: len(xs)], "b_v", True)[1]))
        return out, enc.item_keys[: len(xs)]

    def learn_shard(self, xs: Sequence[X], ys: Sequence[int] | np.ndarray, mine: Sequence[int],
                    all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One data-parallel step of a group of ranks: ``xs, ys`` (B,) is the union of every
        rank's micro-batch (the same list, in the same order, on every rank), ``mine`` the
        indices in it of this rank's examples, ``all_reduce`` sums a flat float32 tensor over
        the ranks (every rank calls it exactly once per step, in step) and returns the sum.

        Every rank keeps the non-parameter state identical from the union: the step and
        expiry, rows allocated for new ids (in the union's order, so the same rows and
        generator draws as :meth:`learn_many` of the union), the negatives drawn, the
        frequency estimate and the negative buffer. Only this rank's examples go through
        forward and backward. Each loss term is scaled by this rank's share so that the
        ranks' gradients sum to the union's where the term decomposes per example: BCE by
        ``b_r / B``, DAT's mimic by the share of positives. The in-batch terms (sampled
        softmax over the batch's positives by ``p_r / P``, CIR InfoNCE by ``p_r / P``, DAT
        category alignment by ``b_r / B``) are per-rank in-batch terms, as in DDP with
        per-GPU in-batch negatives: a rank's positives are contrasted with its own batch's
        (and the shared random negatives), not with the other ranks'. One ``all_reduce``
        of ``[grad-present flags | dense grads | grads of the step's rows (U_k, dim) per
        sparse entry]`` is summed, then every rank applies the same Adam step and sparse
        Adagrad (per-example gradients: times the union size B) with the same sums, so all
        ranks hold bitwise the same state. ``last_loss`` is this rank's own, unscaled.
        The union is one micro-batch (``batch_size`` does not split it).
        """
        ys = np.asarray(ys, dtype=np.float32).reshape(-1)
        if len(ys) != len(xs):
            raise ValueError(f"learn_shard got {len(xs)} examples and {len(ys)} labels")
        mine = np.asarray(mine, dtype=np.int64).reshape(-1)
        if len(xs) == 0:
            all_reduce(torch.zeros(0))
            return
        self._ensure_built(xs)
        self.step += 1
        self._expire()
        use_softmax = self.loss in ("softmax", "both")
        negs = self._sample_negatives() if use_softmax else []
        union_rows, item_keys = self._union_rows(xs, negs)
        big_b, big_p = len(xs), int((ys > 0).sum())
        own_xs, own_ys = [xs[i] for i in mine.tolist()], ys[mine]
        b, p = len(own_xs), int((own_ys > 0).sum())
        share = b / big_b
        pshare = p / big_p if big_p else 0.0
        scale = {"bce": share, "softmax": pshare, "cir": pshare, "category": share,
                 "mimic": max(p, 1) / max(big_p, 1)}
        params = [q for g in self.optimizer.param_groups for q in g["params"]]
        self.optimizer.zero_grad(set_to_none=True)
        own_sparse: list = []
        parts: dict[str, torch.Tensor] = {}
        if b:
            fp = self._forward(own_xs, insert=True, extra_items=negs)
            parts, _ = self._loss_parts(fp, own_xs, own_ys, negs, use_softmax, scale)
            if parts:
                sum(parts.values()).backward()
            own_sparse = fp.sparse
        self.last_loss = {k: float(t.detach()) / scale[k] if scale[k] else 0.0 for k, t in parts.items()}
        flags = torch.tensor([0.0 if q.grad is None else 1.0 for q in params])
        pieces = [flags] + [torch.zeros(q.numel()) if q.grad is None else q.grad.reshape(-1) for q in params]
        for k, (store, rows) in enumerate(union_rows):
            g = torch.zeros(len(rows), store.dim)
            if k < len(own_sparse):
                _, own_rows, leaf = own_sparse[k]
                if leaf.grad is not None and len(own_rows):
                    at = np.searchsorted(rows.numpy(), own_rows.numpy())
                    g.index_copy_(0, torch.from_numpy(at), leaf.grad)
            pieces.append(g.reshape(-1))
        flat = all_reduce(torch.cat(pieces).float())
        i = len(params)
        any_grad = False
        for q, f in zip(params, flat[:i].tolist()):
            n = q.numel()
            if f > 0:
                q.grad = flat[i:i + n].reshape(q.shape).clone()
                any_grad = True
            else:
                q.grad = None
            i += n
        if any_grad:
            self.optimizer.step()
            for store, rows in union_rows:
                n = len(rows) * store.dim
                if n:
                    # per-example gradients of the union (the loss summed over its B examples)
                    store.adagrad_(rows, flat[i:i + n].reshape(len(rows), store.dim).mul(big_b), self.lr_sparse)
                i += n
        self.optimizer.zero_grad(set_to_none=True)
        if use_softmax:
            self.freq.update([item_keys[i] for i in np.flatnonzero(ys > 0).tolist()], self.step)
            if self.random_negatives > 0:
                self._remember_items(xs)
        self.n_learned += big_b

    # ------------------------------------------------------------------ two-tower extras
    @staticmethod
    def item_features_of(x: X) -> dict[str, Any]:
        """The item side of an example: ``item_id`` and its ``i:*`` features."""
        return {k: v for k, v in x.items() if k == "item_id" or k.startswith(ITEM_PREFIX)}

    def _tower(self, xs: Sequence[X], side: Literal["user", "item"]) -> TowerOutput:
        self._ensure_built(xs)
        enc = self.encoder.encode(xs if side == "user" else None, xs if side == "item" else None,
                                  insert=False, step=self.step, unique=False)
        emb = self.store.weight
        if side == "user":
            aug = self._id_vectors(self.aug_store, enc.user_keys, "a_u", False)[0] if self.dat else None
            return self.model.user_tower(enc.user, emb, aug)
        aug = self._id_vectors(self.aug_store, enc.item_keys, "a_v", False)[0] if self.dat else None
        return self.model.item_tower(enc.item, emb, aug)

    def encode_items(self, xs: Sequence[X], *, chunk: int = INFERENCE_CHUNK) -> np.ndarray:
        """Item vectors (N, D) float32, L2-normalised (the item tower alone): the examples'
        item fields taken out as columns, then :meth:`encode_item_columns`."""
        if len(xs) == 0:
            return np.zeros((0, self.out_dim), dtype=np.float32)
        self._ensure_built(xs)
        columns = {f: _values(xs, f) for f in self.item_fields[1:]}
        return self.encode_item_columns(_values(xs, "item_id"), columns, chunk=chunk)

    def encode_item_columns(self, item_ids: Sequence[Any], columns: Mapping[str, Sequence[Any]], *,
                            chunk: int = INFERENCE_CHUNK) -> np.ndarray:
        """Item vectors (N, D) float32 of a catalogue given as columns: ``item_ids`` (N,)
        and ``columns`` item field (``"i:tags"``) -> (N,) values (a tuple for a
        multi-valued field, ``None`` where missing); equal to :meth:`encode_items` of the
        item dicts. Each distinct value is resolved to its rows once; the tower runs in
        ``torch.inference_mode`` over chunks of about ``chunk`` items (small enough that
        its intermediates are reused, not page-faulted in afresh: 8k+ items cost more).

        >>> lrn = TwoTowerLearner(seed=1, out_dim=8, field_dim=4)
        >>> lrn.learn_many([{"user_id": "u", "item_id": "i1", "i:tags": ("a", "b")}], [1])
        >>> v = lrn.encode_item_columns(["i1", "new"], {"i:tags": [("a", "b"), None]})
        >>> v.shape, bool((v == lrn.encode_items([{"item_id": "i1", "i:tags": ("a", "b")}, {"item_id": "new"}])).all())
        ((2, 8), True)
        """
        n = len(item_ids)
        if n == 0:
            return np.zeros((0, self.out_dim), dtype=np.float32)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if self.model is None:
            self._ensure_built([dict.fromkeys(("item_id", *columns))])
        with torch.inference_mode():
            bags = self.encoder.encode_columns(item_ids, columns, "item")
            aug_rows = self._id_rows(self.aug_store, _plain(item_ids), "a_v") if self.dat else None
            out = None
            parts = -(-n // chunk)  # near-equal parts: no tiny tail (GEMV rounds differently)
            bounds = [n * i // parts for i in range(parts + 1)]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                aug = self._rows_vectors(self.aug_store, aug_rows[lo:hi]) if aug_rows is not None else None
                vec = self.model.item_tower(bags.index(lo, hi), self.store.weight, aug).vec
                if out is None:
                    out = np.empty((n, vec.shape[1]), dtype=np.float32)
                out[lo:hi] = vec.numpy()
        return out

    @staticmethod
    def _id_rows(store: EmbeddingStore, keys: Sequence[Any], field: str) -> np.ndarray:
        """Store rows (N,) of the ids ``keys`` in ``field`` (-1: unknown), never allocating."""
        table = store.table(field)
        return np.fromiter(map(table.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))

    @staticmethod
    def _rows_vectors(store: EmbeddingStore, rows: np.ndarray) -> torch.Tensor:
        """The rows ``rows`` (N,) of ``store`` as (N, dim), zeros where -1 (``_id_vectors`` at inference)."""
        known = rows >= 0
        if known.all():
            return store.weight.index_select(0, torch.from_numpy(rows))
        out = torch.zeros(len(rows), store.dim)
        at = torch.from_numpy(np.flatnonzero(known))
        return out.index_copy_(0, at, store.weight.index_select(0, torch.from_numpy(rows[known])))

    def encode_users(self, xs: Sequence[X]) -> np.ndarray:
        """User vectors (N, D) float32, L2-normalised: ``encode_users @ encode_items.T``
        ranks items as the model does (exactly, with one FE item head)."""
        if len(xs) == 0:
            return np.zeros((0, self.out_dim), dtype=np.float32)
        with torch.no_grad():
            return self._tower(xs, "user").vec.numpy().astype(np.float32, copy=False)

    def score_candidates(self, user_x: X, item_xs: Sequence[X]) -> np.ndarray:
        """Pre-ranking: P(click) (N,) of one user for each candidate item, by the model's
        full score (the FE-block's max/sum over heads when enabled), without position."""
        if len(item_xs) == 0:
            return np.zeros(0)
        u = self.user_side([user_x])  # the user first, as before: an unbuilt model infers its fields from it
        n = len(item_xs)
        return self.score_item_side(u, self.item_side(item_xs), np.arange(n), np.zeros(n, dtype=np.int64))

    def item_side(self, item_xs: Sequence[X]) -> "ItemSide":
        """The item half of pre-ranking for ``item_xs``, computed once (the scorer keeps it
        per model version): item tower outputs and the item bias. With it,
        :meth:`score_item_side` pre-ranks candidates without touching their feature dicts."""
        with torch.no_grad():
            v = self._tower(item_xs, "item")
            bias = (self._id_vectors(self.bias_store, [x.get("item_id") for x in item_xs], "b_v", False)[0][:, 0]
                    if self.item_bias else None)
        return ItemSide(v.vec, v.heads, bias)

    def user_side(self, user_xs: Sequence[X]) -> TowerOutput:
        """The user tower's output for ``user_xs`` (``vec`` is :meth:`encode_users`): the
        scorer computes it once per batch for retrieval and pre-ranking both."""
        with torch.no_grad():
            return self._tower(list(user_xs), "user")

    def score_item_side(self, users: Sequence[X] | TowerOutput, side: "ItemSide", rows: np.ndarray,
                        owners: np.ndarray) -> np.ndarray:
        """:meth:`score_candidates` for a whole batch at once: candidate ``j`` is row
        ``rows[j]`` of a precomputed :meth:`item_side`, scored for user ``owners[j]`` of
        ``users`` (examples, or their :meth:`user_side`; one logit over every candidate).
        The same numbers as per-user :meth:`score_candidates` up to float rounding."""
        if len(rows) == 0:
            return np.zeros(0)
        with torch.no_grad():
            u = users if isinstance(users, TowerOutput) else self._tower(list(users), "user")
            idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
            own = torch.from_numpy(np.asarray(owners, dtype=np.int64))
            v = TowerOutput(side.vec[idx], None if side.heads is None else side.heads[idx])
            ue = TowerOutput(u.vec[own], None if u.heads is None else u.heads[own])
            z = self.model.logit(ue, v)
            if side.bias is not None:
                z = z + side.bias[idx]
            return torch.sigmoid(z).double().numpy()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue learning bit for bit (copies, not references)."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "spec": self.spec,
            "step": self.step,
            "n_learned": self.n_learned,
            "generator": self._generator.get_state(),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "store": self.store.state_dict(),
            "aug_store": self.aug_store.state_dict() if self.aug_store is not None else None,
            "bias_store": self.bias_store.state_dict() if self.bias_store is not None else None,
            "freq": self.freq.state_dict(),
            "negatives": [(k, dict(v)) for k, v in self._negatives.items()],
            "fields": None,
        }
        if self.model is not None:
            state["fields"] = (list(self.user_fields), list(self.item_fields))
            state["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"two-tower state version {state.get('version')!r}, this code reads {_STATE_VERSION}")
        if state["spec"]["name"] != self.name:
            logger.warning("loading a %r state into a %r learner", state["spec"]["name"], self.name)
        self.step = int(state["step"])
        self.n_learned = int(state["n_learned"])
        self._generator.set_state(state["generator"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.store.load_state_dict(state["store"])
        if self.aug_store is not None and state["aug_store"] is not None:
            self.aug_store.load_state_dict(state["aug_store"])
        if self.bias_store is not None and state.get("bias_store") is not None:
            self.bias_store.load_state_dict(state["bias_store"])
        self.freq.load_state_dict(state["freq"])
        self._negatives = {k: dict(v) for k, v in state["negatives"]}
        if state["fields"] is not None:
            self._build(*state["fields"])
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


def make(name: str, **params: Any) -> TwoTowerLearner:
    """The learner registered as ``name`` (a key of :data:`PRESETS`), ``params`` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown two-tower learner {name!r}; known: {', '.join(PRESETS)}")
    return TwoTowerLearner(name=name, **{**PRESETS[name], **params})


def two_tower(**params: Any) -> TwoTowerLearner:
    """Registry factory ``two-tower``: the plain two-tower."""
    return make("two-tower", **params)


def inttower(**params: Any) -> TwoTowerLearner:
    """Registry factory ``inttower``: Light-SE, FE-block and CIR on."""
    return make("inttower", **params)


def dat(**params: Any) -> TwoTowerLearner:
    """Registry factory ``dat``: dual augmented vectors with adaptive mimic."""
    return make("dat", **params)
