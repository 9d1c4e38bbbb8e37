"""Building blocks of the towers: MLP, LightSE and the FE-block projections.

Shapes follow TorchRec's habit of writing them in docstrings: ``B`` examples, ``F``
fields, ``e`` field-embedding width, ``H`` heads, ``d`` head width.

>>> import torch
>>> se = LightSE(n_fields=3)
>>> se(torch.ones(2, 3, 4)).shape
torch.Size([2, 3, 4])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "LightSE", "FEProjection", "fe_score", "fe_score_matrix"]


class MLP(nn.Module):
    """Linear + ReLU layers, then a linear output layer (no activation).

    ``forward(x)`` returns the output (B, out_dim); ``forward_layers(x)`` also returns the
    input of every linear layer, ``[x, h_1, ..., h_L]`` (what the FE-block reads).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], out_dim)
        self.layer_dims = tuple(dims)

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = [x]
        for layer in self.hidden:
            x = F.relu(layer(x), inplace=True)
            inputs.append(x)
        return self.out(x), inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x), inplace=True)
        return self.out(x)


class LightSE(nn.Module):
    """IntTower's Light-SE: one FC layer gives per-field importance weights.

    ``Z = mean_e(E)`` (B, F); ``A = softmax(Z W + b)`` (B, F); output ``E + E * A`` (B, F, e)
    (the residual keeps a field whose weight goes to zero from vanishing, as in the
    official code). SENet's two-layer squeeze/excite is replaced by a single layer.
    """

    def __init__(self, n_fields: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_fields, n_fields)

    def weights(self, emb: torch.Tensor) -> torch.Tensor:
        """Field importances (B, F) of field embeddings ``emb`` (B, F, e)."""
        return torch.softmax(self.fc(emb.mean(dim=-1)), dim=-1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return emb + emb * self.weights(emb).unsqueeze(-1)


class FEProjection(nn.Module):
    """Projects layer representations into ``heads`` L2-normalised sub-vectors.

    Given representations ``[r_0, ..., r_k]`` (each (B, dim_i)), returns (B, sum_i heads, d):
    head vectors of every layer stacked (the user side of the FE-block uses every layer,
    the item side only its last).
    """

    def __init__(self, in_dims: Sequence[int], heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.proj = nn.ModuleList(nn.Linear(d, heads * head_dim) for d in in_dims)

    def forward(self, reps: Sequence[torch.Tensor]) -> torch.Tensor:
        out = [p(r).view(r.shape[0], self.heads, self.head_dim) for p, r in zip(self.proj, reps)]
        return F.normalize(torch.cat(out, dim=1), dim=-1)


def fe_score(user_heads: torch.Tensor, item_heads: torch.Tensor) -> torch.Tensor:
    """ColBERT-style late interaction, row by row: sum over user heads of the max over
    item heads of the dot product. ``user_heads`` (B, Hu, d), ``item_heads`` (B, Hi, d) -> (B,).

    >>> u = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]); v = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    >>> fe_score(u, v)
    tensor([1.8000])
    """
    if item_heads.shape[1] == 1:
        return (user_heads * item_heads).sum(dim=-1).sum(dim=-1)
    return torch.bmm(user_heads, item_heads.transpose(1, 2)).amax(dim=2).sum(dim=1)


def fe_score_matrix(user_heads: torch.Tensor, item_heads: torch.Tensor) -> torch.Tensor:
    """:func:`fe_score` for every (user, item) pair: (Bu, Hu, d) x (Bi, Hi, d) -> (Bu, Bi)."""
    if item_heads.shape[1] == 1:
        return user_heads.sum(dim=1) @ item_heads[:, 0].T
    sims = torch.einsum("uhd,ikd->uihk", user_heads, item_heads)
    return sims.amax(dim=3).sum(dim=2)
