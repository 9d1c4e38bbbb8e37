"""Small fakes and data generators for tests and benchmarks of the indexer.

:class:`FakeTwoTower` conforms to :class:`~indexer.guardrail.TwoTowerEncoder`: items and
users of the same topic get nearby unit vectors, so the retrieval score
``<user, item>`` separates clicks (same topic) from non-clicks, and a ``broken`` model
(vectors unrelated to topics) scores an AUC near 0.5.

>>> enc = FakeTwoTower(dim=8, n_topics=4)
>>> xs = [{"user_id": "u1", "u:topic": "t1", "item_id": "i1", "i:topic": "t1"}]
>>> enc.encode_items(xs).shape, round(float(np.linalg.norm(enc.encode_users(xs)[0])), 5)
((1, 8), 1.0)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from indexer.service import FrozenModel
from learners.base import X

__all__ = [
    "FakeTwoTower",
    "FakeCheckpointSource",
    "catalogue_records",
    "labelled_impressions",
    "mixture_of_gaussians",
]


_NOISE_ROWS = 1 << 14


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _seed(text: str, salt: int) -> int:
    return zlib.crc32(text.encode("utf-8")) ^ (salt * 0x9E3779B1 & 0xFFFFFFFF)


class FakeTwoTower:
    """A deterministic two-tower stand-in.

    Parameters
    ----------
    dim
        Vector dimension D.
    n_topics
        Topics ``t0..t{n-1}``; a topic is read from ``i:topic`` / ``u:topic``.
    noise
        Per-id noise around the topic centre.
    broken
        Ignore topics: every vector is id noise only (a deliberately bad model).
    seed
        Seeds the topic centres.
    """

    def __init__(self, dim: int = 16, n_topics: int = 8, noise: float = 0.3, broken: bool = False,
                 seed: int = 0) -> None:
        self.dim = dim
        self.n_topics = n_topics
        self.noise = noise
        self.broken = broken
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.centres = _unit(rng.normal(size=(n_topics, dim)))
        # Per-id noise: the sum of two rows picked by the id's hash (2^28 combinations).
        self._noise = rng.normal(size=(2, _NOISE_ROWS, dim)) / np.sqrt(2.0)
        self.item_calls = 0

    def __repr__(self) -> str:
        return f"FakeTwoTower(dim={self.dim}, n_topics={self.n_topics}, noise={self.noise}, broken={self.broken})"

    def _vecs(self, idents: Sequence[str], topics: Sequence[Any], salt: int) -> np.ndarray:
        h = np.fromiter((_seed(i, salt + self.seed) for i in idents), dtype=np.int64, count=len(idents))
        noise = self._noise[0, h % _NOISE_ROWS] + self._noise[1, (h >> 14) % _NOISE_ROWS]
        if self.broken:
            return _unit(noise)
        t = np.fromiter((int(str(t)[1:]) % self.n_topics if isinstance(t, str) and t[1:].isdigit() else 0
                         for t in topics), dtype=np.int64, count=len(topics))
        return _unit(self.centres[t] + self.noise * noise / np.sqrt(self.dim))

    def encode_items(self, xs: Sequence[X]) -> np.ndarray:
        """Item vectors, shape (N, D), L2-normalised."""
        self.item_calls += 1
        if not xs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._vecs([str(x["item_id"]) for x in xs], [x.get("i:topic") for x in xs], 1)

    def encode_users(self, xs: Sequence[X]) -> np.ndarray:
        """User vectors, shape (N, D), L2-normalised."""
        if not xs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._vecs([str(x["user_id"]) for x in xs], [x.get("u:topic") for x in xs], 2)


@dataclass
class FakeCheckpointSource:
    """A :class:`~indexer.service.CheckpointSource` over an in-memory encoder.

    Assign ``encoder`` / ``events_learned`` and call :meth:`bump` to simulate a new
    checkpoint being written.
    """

    encoder: Any
    events_learned: int = 0
    offsets: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    generation: int = 1
    loads: int = 0

    def bump(self, encoder: Any = None, events_learned: int | None = None) -> None:
        """A new checkpoint: optionally another encoder and event count."""
        if encoder is not None:
            self.encoder = encoder
        if events_learned is not None:
            self.events_learned = events_learned
        self.generation += 1

    def stamp(self) -> object | None:
        return self.generation

    def load(self) -> FrozenModel:
        self.loads += 1
        return FrozenModel(encoder=self.encoder, source=f"fake://checkpoint/{self.generation}",
                           offsets=self.offsets, events_learned=self.events_learned,
                           spec={"name": "fake-two-tower", "params": {}})


def catalogue_records(n_items: int, n_topics: int = 8, start: int = 0) -> list[dict[str, Any]]:
    """Catalogue records ``{"item_id": "i<j>", "item_features": {"topic": "t<j % n_topics>"}}``."""
    return [{"item_id": f"i{j}", "item_features": {"topic": f"t{j % n_topics}"}}
            for j in range(start, start + n_items)]


def labelled_impressions(
    n: int, n_users: int = 200, n_items: int = 500, n_topics: int = 8, flip: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Impression examples and labels: a click iff user and item share a topic, with
    ``flip`` of the labels flipped."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    xs, ys = [], []
    for u, i in zip(users, items):
        ut, it = f"t{u % n_topics}", f"t{i % n_topics}"
        xs.append({"user_id": f"u{u}", "u:topic": ut, "item_id": f"i{i}", "i:topic": it})
        y = int(ut == it)
        ys.append(1 - y if rng.random() < flip else y)
    return xs, np.asarray(ys, dtype=np.int64)


def mixture_of_gaussians(
    n: int, dim: int = 64, n_clusters: int = 1000, spread: float = 0.6, seed: int = 0, centres_seed: int = 0
) -> np.ndarray:
    """``n`` unit vectors from a mixture of Gaussians on the sphere, shape (n, dim) float32.

    Cluster sizes follow a Zipf-like law (popular topics are bigger), ``spread`` is the
    within-cluster standard deviation relative to the unit-norm centres. Queries drawn
    with the same ``centres_seed`` and another ``seed`` come from the same mixture.
    """
    centres = _unit(np.random.default_rng(centres_seed).normal(size=(n_clusters, dim)))
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    assign = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), dtype=np.float32)
    step = 65536
    for s in range(0, n, step):
        a = assign[s:s + step]
        out[s:s + step] = _unit(centres[a] + spread / np.sqrt(dim) * rng.normal(size=(len(a), dim)).astype(np.float32))
    return out
