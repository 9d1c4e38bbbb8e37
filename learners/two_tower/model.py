"""The two-tower network (plain, IntTower, DAT): it returns embeddings, nothing more.

The model holds only dense parameters (MLPs, LightSE, FE projections, score scale and
bias, position bias). Embedding rows live in :class:`~learners.two_tower.features.EmbeddingStore`
and come in as ``emb``: when learning, the batch's unique rows gathered into a leaf
tensor (U, e) whose gradient the updater applies sparsely; at inference the store's
whole table. Each tower reads it through its
:class:`~learners.two_tower.features.TowerIndex` bags. Losses live in
:mod:`learners.two_tower.losses`; the optimizer, batching and clock in the updater.

* plain two-tower: field embeddings -> MLP -> L2-normalised vector (B, D);
  score = ``scale * <u, v> + bias``;
* IntTower (Li et al., CIKM 2022): ``lightse`` re-weights the fields of each tower;
  ``fe`` makes the user tower emit ``fe_user_heads`` unit sub-vectors from every layer
  (input, hidden layers, output) and the item tower ``fe_item_heads`` from its last
  layer, each of width ``out_dim / fe_item_heads``; the FE score is ColBERT-style (max
  over item heads, summed over user heads and layers). The item vector for the index
  is the concatenation of its heads (scaled to unit norm), the user vector the sum of
  its heads repeated per item head: their dot product is the FE score with the max over
  item heads replaced by a mean - exact with one item head, an upper-bounded
  approximation otherwise (pre-ranking uses the exact score, see ``score_candidates``);
* DAT (Yu et al. 2021): ``dat`` appends the augmented vector of the user id (``a_u``,
  (B, D)) to the user tower's input and that of the item id (``a_v``) to the item
  tower's; the adaptive-mimic loss teaches them the other tower's vectors.

The item tower runs alone: :meth:`TwoTowerModel.item_tower`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from learners.two_tower.blocks import MLP, FEProjection, LightSE, fe_score, fe_score_matrix
from learners.two_tower.features import TowerIndex

__all__ = ["ModelConfig", "TowerOutput", "TwoTowerModel"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of the network (all plain values: it rebuilds from a dict)."""

    n_user_fields: int
    n_item_fields: int
    field_dim: int = 16
    hidden: tuple[int, ...] = ()
    out_dim: int = 64
    lightse: bool = False
    fe: bool = False
    fe_user_heads: int = 1
    fe_item_heads: int = 1
    dat: bool = False
    n_positions: int = 0
    init_scale: float = 5.0


@dataclass(frozen=True)
class TowerOutput:
    """One tower's answer: ``vec`` (B, D) L2-normalised, ``heads`` (B, H, d) with the FE-block."""

    vec: torch.Tensor
    heads: torch.Tensor | None = None


class TwoTowerModel(nn.Module):
    """User tower, item tower and the score between them; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        aug = c.out_dim if c.dat else 0
        self.user_se = LightSE(c.n_user_fields) if c.lightse else None
        self.item_se = LightSE(c.n_item_fields) if c.lightse else None
        self.user_mlp = MLP(c.n_user_fields * c.field_dim + aug, c.hidden, c.out_dim)
        self.item_mlp = MLP(c.n_item_fields * c.field_dim + aug, c.hidden, c.out_dim)
        if c.fe:
            if c.out_dim % c.fe_item_heads:
                raise ValueError(f"out_dim ({c.out_dim}) must be a multiple of fe_item_heads ({c.fe_item_heads})")
            head_dim = c.out_dim // c.fe_item_heads
            self.user_fe = FEProjection([*self.user_mlp.layer_dims, c.out_dim], c.fe_user_heads, head_dim)
            self.item_fe = FEProjection([c.out_dim], c.fe_item_heads, head_dim)
            self._n_user_heads = c.fe_user_heads * (len(self.user_mlp.layer_dims) + 1)
        self.scale = nn.Parameter(torch.tensor(float(c.init_scale)))
        self.bias = nn.Parameter(torch.zeros(()))
        self.position_bias = nn.Embedding(c.n_positions, 1) if c.n_positions > 0 else None
        if self.position_bias is not None:
            nn.init.zeros_(self.position_bias.weight)

    @staticmethod
    def _fields(index: TowerIndex, emb: torch.Tensor, se: LightSE | None, aug: torch.Tensor | None) -> torch.Tensor:
        bags = F.embedding_bag(index.inverse, emb, index.offsets, mode="mean")
        fields = bags.view(index.n_fields, index.batch_size, emb.shape[1]).transpose(0, 1)
        if se is not None:
            fields = se(fields)
        x = fields.reshape(index.batch_size, -1)
        return x if aug is None else torch.cat([x, aug], dim=1)

    def user_tower(self, index: TowerIndex, emb: torch.Tensor, aug: torch.Tensor | None = None) -> TowerOutput:
        """User vectors (B, D) from bags ``index`` over rows ``emb`` (U, e); ``aug`` (B, D) with DAT."""
        x = self._fields(index, emb, self.user_se, aug)
        if not self.config.fe:
            return TowerOutput(F.normalize(self.user_mlp(x), dim=-1))
        out, inputs = self.user_mlp.forward_layers(x)
        heads = self.user_fe([*inputs, out])
        pooled = heads.sum(dim=1)
        if self.config.fe_item_heads > 1:
            pooled = pooled.repeat(1, self.config.fe_item_heads)
        return TowerOutput(F.normalize(pooled, dim=-1), heads)

    def item_tower(self, index: TowerIndex, emb: torch.Tensor, aug: torch.Tensor | None = None) -> TowerOutput:
        """Item vectors (B, D): this alone is what the indexer freezes."""
        out = self.item_mlp(self._fields(index, emb, self.item_se, aug))
        if not self.config.fe:
            return TowerOutput(F.normalize(out, dim=-1))
        heads = self.item_fe([out])
        return TowerOutput(heads.reshape(heads.shape[0], -1) * self.config.fe_item_heads ** -0.5, heads)

    def forward(
        self,
        user: TowerIndex,
        item: TowerIndex,
        emb: torch.Tensor,
        user_aug: torch.Tensor | None = None,
        item_aug: torch.Tensor | None = None,
    ) -> tuple[TowerOutput, TowerOutput]:
        """Both towers over one batch: (user output, item output)."""
        return self.user_tower(user, emb, user_aug), self.item_tower(item, emb, item_aug)

    def similarity(self, u: TowerOutput, v: TowerOutput) -> torch.Tensor:
        """Row-wise similarity (B,) in [-1, 1]: cosine, or the FE score over user heads."""
        if self.config.fe:
            return fe_score(u.heads, v.heads) / self._n_user_heads
        return (u.vec * v.vec).sum(dim=-1)

    def similarity_matrix(self, u: TowerOutput, v: TowerOutput) -> torch.Tensor:
        """:meth:`similarity` for all pairs: (Bu, Bi)."""
        if self.config.fe:
            return fe_score_matrix(u.heads, v.heads) / self._n_user_heads
        return u.vec @ v.vec.T

    def logit(self, u: TowerOutput, v: TowerOutput, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Click logit (B,): ``scale * similarity + bias`` (+ a position bias when given;
        ``positions`` (B,) with -1 for none)."""
        z = self.scale * self.similarity(u, v) + self.bias
        if positions is not None and self.position_bias is not None:
            known = positions >= 0
            pb = self.position_bias(positions.clamp(0, self.config.n_positions - 1)).squeeze(-1)
            z = z + torch.where(known, pb, torch.zeros_like(pb))
        return z
