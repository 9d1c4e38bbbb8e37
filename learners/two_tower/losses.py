"""Losses of the two-tower family, apart from the model, and the streaming item-frequency
estimate that the sampled softmax corrects with.

* :func:`bce` - binary cross-entropy on impression labels (pre-ranking);
* :func:`sampled_softmax` - in-batch softmax over clicked pairs with logQ correction
  (Yi et al., RecSys 2019), optionally with extra random negatives (mixed negative
  sampling, Yang et al. 2020);
* :func:`info_nce` - IntTower's CIR: contrastive InfoNCE between a user and its
  positive item against the other positives of the batch;
* :func:`mimic` - DAT's adaptive-mimic loss: an augmented vector moves toward the
  (stop-gradient) vector of the other tower on positive pairs;
* :func:`category_alignment` - DAT's category alignment: item-vector covariances of
  each category matched to the largest category of the batch.

>>> est = FrequencyEstimator(buckets=64, alpha=0.5, init_interval=10.0)
>>> for step in range(1, 5):
...     est.update(["a"], step)
>>> float(est.interval(["a"])[0]) < 10.0
True
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FrequencyEstimator",
    "bce",
    "sampled_softmax",
    "info_nce",
    "mimic",
    "category_alignment",
]

_HASH_SEEDS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


class FrequencyEstimator:
    """Streaming estimate of how often each item is in a batch (Yi et al. 2019, Alg. 2).

    Arrays ``A`` (last step an item's bucket was seen) and ``B`` (smoothed interval, in
    steps, between sightings) per hash function; the interval estimate of an item is the
    max over hash functions (collisions only shorten intervals), and its in-batch
    sampling probability is ``1 / interval``. Hashes are CRC32 of the key (stable across
    processes), cached per key.
    """

    def __init__(self, buckets: int = 1 << 18, hashes: int = 2, alpha: float = 0.05, init_interval: float = 100.0) -> None:
        if not 1 <= hashes <= len(_HASH_SEEDS):
            raise ValueError(f"hashes must be in 1..{len(_HASH_SEEDS)}, got {hashes}")
        self.buckets = buckets
        self.alpha = alpha
        self.init_interval = init_interval
        self.last = np.zeros((hashes, buckets), dtype=np.int64)
        self.interval_ = np.full((hashes, buckets), init_interval, dtype=np.float64)
        self._cache: dict[Any, np.ndarray] = {}

    def _slots(self, keys: Sequence[Any]) -> np.ndarray:
        cache = self._cache
        out = np.empty((len(self.last), len(keys)), dtype=np.int64)
        for j, k in enumerate(keys):
            s = cache.get(k)
            if s is None:
                raw = str(k).encode()
                s = np.array([zlib.crc32(raw, seed) % self.buckets for seed in _HASH_SEEDS[: len(self.last)]])
                if len(cache) > 4 * self.buckets:
                    cache.clear()
                cache[k] = s
            out[:, j] = s
        return out

    def update(self, keys: Iterable[Any], step: int) -> None:
        """Record that ``keys`` were in the batch of ``step`` (each distinct key once)."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return
        slots = self._slots(keys)
        for h in range(len(self.last)):
            s = slots[h]
            seen = self.last[h, s] > 0
            gap = np.where(seen, step - self.last[h, s], self.interval_[h, s])
            self.interval_[h, s] = (1 - self.alpha) * self.interval_[h, s] + self.alpha * gap
            self.last[h, s] = step

    def interval(self, keys: Sequence[Any]) -> np.ndarray:
        slots = self._slots(keys)
        return np.max(np.stack([self.interval_[h, slots[h]] for h in range(len(self.last))]), axis=0)

    def log_q(self, keys: Sequence[Any]) -> torch.Tensor:
        """log sampling probability (N,) of each key: ``-log(interval)``."""
        return torch.from_numpy(-np.log(np.maximum(self.interval(keys), 1.0))).float()

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last.copy(), "interval": self.interval_.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if np.shape(state["last"]) != self.last.shape:
            raise ValueError(f"frequency arrays of shape {np.shape(state['last'])}, this learner has {self.last.shape}")
        self.last = np.array(state["last"], dtype=np.int64)
        self.interval_ = np.array(state["interval"], dtype=np.float64)


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of logits (B,) against 0/1 labels (B,)."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def _same_key_mask(keys: Sequence[Any], other: Sequence[Any] | None = None) -> torch.Tensor:
    """(N, M) True where row i's key equals column j's key, off the diagonal."""
    codes: dict[Any, int] = {}
    a = torch.tensor([codes.setdefault(k, len(codes)) for k in keys])
    b = a if other is None else torch.tensor([codes.setdefault(k, len(codes)) for k in other])
    mask = a[:, None] == b[None, :]
    if other is None:
        mask.fill_diagonal_(False)
    return mask


def sampled_softmax(
    sim: torch.Tensor,
    scale: float | torch.Tensor,
    item_keys: Sequence[Any],
    log_q: torch.Tensor | None = None,
    neg_sim: torch.Tensor | None = None,
    neg_keys: Sequence[Any] | None = None,
    neg_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch softmax over P clicked pairs.

    ``sim`` (P, P): similarity of user i with the item of pair j (the positive on the
    diagonal). ``log_q`` (P,): log sampling probability of each in-batch item, subtracted
    from its column (logQ correction). ``neg_sim`` (P, K) and ``neg_log_q`` (K,): extra
    random negatives. Columns holding the row's own positive item (the same item clicked
    twice in the batch) are masked out.
    """
    logits = sim * scale
    if log_q is not None:
        logits = logits - log_q[None, :]
    logits = logits.masked_fill(_same_key_mask(item_keys), float("-inf"))
    if neg_sim is not None:
        neg = neg_sim * scale
        if neg_log_q is not None:
            neg = neg - neg_log_q[None, :]
        if neg_keys is not None:
            neg = neg.masked_fill(_same_key_mask(item_keys, neg_keys), float("-inf"))
        logits = torch.cat([logits, neg], dim=1)
    target = torch.arange(sim.shape[0])
    return F.cross_entropy(logits, target)


def info_nce(user_vec: torch.Tensor, item_vec: torch.Tensor, item_keys: Sequence[Any], tau: float = 0.1) -> torch.Tensor:
    """CIR: InfoNCE of each user (P, D) against its positive item (P, D) and the other
    positives of the batch as negatives, at temperature ``tau`` (vectors L2-normalised)."""
    logits = (user_vec @ item_vec.T) / tau
    logits = logits.masked_fill(_same_key_mask(item_keys), float("-inf"))
    return F.cross_entropy(logits, torch.arange(user_vec.shape[0]))


def mimic(aug: torch.Tensor, target: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """DAT adaptive-mimic: mean over positive rows of ``||aug - stopgrad(target)||^2``.

    ``aug`` and ``target`` (B, D), ``positive`` (B,) 0/1. Zero when the batch has no positive.
    """
    w = positive.float()
    per_row = ((aug - target.detach()) ** 2).sum(dim=-1)
    return (per_row * w).sum() / w.sum().clamp(min=1.0)


def category_alignment(item_vec: torch.Tensor, categories: Sequence[Any]) -> torch.Tensor:
    """DAT category alignment: sum over categories j of ``||C(major) - C(j)||_F^2`` with
    ``C`` the covariance of the item vectors (N, D) of a category in the batch and
    ``major`` the largest one. Categories with fewer than 2 items are skipped."""
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(categories):
        if c is not None:
            groups.setdefault(c, []).append(i)
    sizes = sorted(((len(v), str(k), k) for k, v in groups.items() if len(v) >= 2), reverse=True)
    if len(sizes) < 2:
        return item_vec.sum() * 0.0

    def cov(idx: list[int]) -> torch.Tensor:
        x = item_vec[idx]
        x = x - x.mean(dim=0, keepdim=True)
        return x.T @ x / (len(idx) - 1)

    major = cov(groups[sizes[0][2]])
    return sum(((major - cov(groups[k])) ** 2).sum() for _, _, k in sizes[1:])
