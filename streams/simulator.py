"""A click-stream simulator with planted ground truth.

Users and items live in a latent space that their side features explain in part, so a
model that learns from features (or ids) has something real to find, and the true click
probability of every (user, item, position) is known. The stream is non-stationary on
purpose: user preferences and item popularity drift, and new items arrive mid-stream.

Click model, for user ``u`` shown item ``i`` at 0-based position ``pos``::

    P(click) = examine(pos) * sigmoid(base + a * sqrt(dim) * <u, v_i> + b * pop_i
                                      + c * (A[age_u, category_i] + B[activity_u, price_i]) / sqrt(2))
    examine(pos) = 1 / (1 + pos) ** position_decay

``u`` and ``v`` are unit vectors mixed from feature-driven parts (user segment, item
category and tags) and individual noise; ``pop_i`` in [-1, 1] falls with the item's
popularity rank. ``base`` is calibrated so the overall click-through rate is about
``target_ctr`` unless ``base_logit`` is given.

Per request the stream yields one ``request`` event, then one ``impression`` per slate
slot (``label`` 1 if clicked), then one ``click`` per clicked impression. Slates mix
popular items (Zipf over popularity ranks), uniformly random items and fresh arrivals,
in random order. Event time is a simulated clock (``start_time`` plus the event index
divided by ``event_rate``), never the wall clock. Everything is deterministic for a
configuration (seed included).

>>> sim = ClickSimulator(SimulatorConfig(seed=7, n_users=50, n_items=40, slate_size=4))
>>> [(e.kind, e.position) for e in sim.events(max_events=5)]
[('request', None), ('impression', 0), ('impression', 1), ('impression', 2), ('impression', 3)]
>>> 0.0 < sim.true_click_probability("u3", "i5", position=0) < 1.0
True
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from streams.errors import ConfigError
from streams.events import Event

__all__ = ["SimulatorConfig", "ClickSimulator", "DriftPoint"]

AGE_BUCKETS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55+")
GENDERS: tuple[str, ...] = ("F", "M")
REGIONS: tuple[str, ...] = ("na", "eu", "latam", "apac", "mea")
ACTIVITY_LEVELS: tuple[str, ...] = ("low", "mid", "high")
PRICE_BUCKETS: tuple[str, ...] = ("low", "mid", "high")

_AGE_P = np.array([0.2, 0.3, 0.25, 0.15, 0.1])
_REGION_P = np.array([0.3, 0.3, 0.15, 0.2, 0.05])
_ACTIVITY_P = np.array([0.5, 0.35, 0.15])
_ACTIVITY_RATE = np.array([1.0, 3.0, 9.0])  # relative request frequency per activity level
_PRICE_P = np.array([0.5, 0.35, 0.15])
_TAGS_PER_CATEGORY = 5


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that determines a simulated stream.

    Parameters
    ----------
    seed
        Seed of every random draw: the same configuration gives the same events.
    n_users, n_items
        Users, and items in the initial catalogue.
    dim
        Dimension of the latent user and item factors.
    n_categories, n_tags
        Item categories and tags (each category prefers a few tags).
    zipf_exponent
        Popularity-driven slate slots pick the item of rank ``r`` with weight ``r ** -s``.
    slate_size
        Items shown per request.
    explore_fraction, fresh_fraction, fresh_window
        Share of slate slots filled uniformly from the catalogue, and from the
        ``fresh_window`` most recently arrived items; the rest follow popularity.
    affinity_weight, popularity_weight, interaction_weight
        ``a``, ``b`` and ``c`` of the click model (see the module docstring).
    position_decay
        Examination probability at position ``pos`` is ``1 / (1 + pos) ** position_decay``.
    base_logit
        ``base`` of the click model; ``None`` calibrates it so the overall CTR is
        about ``target_ctr``.
    target_ctr
        Overall click-through rate aimed at when ``base_logit`` is ``None``.
    user_feature_strength, item_category_strength
        In [0, 1]: how much of a user's (item's) latent factor its features explain.
    drift_every
        Drift every this many events (``None``: not periodically).
    drift_at
        Further event counts at which to drift. A drift takes effect at the first
        request boundary at or after its count.
    drift_strength
        In [0, 1]: how far user factors move toward freshly drawn ones at a drift.
    drift_popularity_shuffle
        In [0, 1]: share of items whose popularity ranks are shuffled at a drift.
    new_item_rate
        Expected new items per event. Arrivals are drawn between batches of requests
        for the events of the batch before, so none arrive before the first batch.
    start_time, event_rate
        Simulated clock: event ``n`` happens at ``start_time + n / event_rate``.
    batch_requests
        Requests generated per vectorised batch.
    """

    seed: int = 0
    n_users: int = 10_000
    n_items: int = 5_000
    dim: int = 16
    n_categories: int = 20
    n_tags: int = 40
    zipf_exponent: float = 1.0
    slate_size: int = 10
    explore_fraction: float = 0.2
    fresh_fraction: float = 0.05
    fresh_window: int = 100
    affinity_weight: float = 1.5
    popularity_weight: float = 0.5
    interaction_weight: float = 0.5
    position_decay: float = 1.0
    base_logit: float | None = None
    target_ctr: float = 0.10
    user_feature_strength: float = 0.8
    item_category_strength: float = 0.8
    drift_every: int | None = 100_000
    drift_at: tuple[int, ...] = ()
    drift_strength: float = 0.5
    drift_popularity_shuffle: float = 0.3
    new_item_rate: float = 0.0005
    start_time: float = 1_700_000_000.0
    event_rate: float = 1000.0
    batch_requests: int = 128

    def __post_init__(self) -> None:
        positive = ("n_users", "n_items", "dim", "n_categories", "n_tags", "slate_size", "batch_requests")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"SimulatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.slate_size > self.n_items:
            raise ConfigError(
                f"SimulatorConfig.slate_size ({self.slate_size}) cannot exceed n_items ({self.n_items})"
            )
        unit = ("explore_fraction", "fresh_fraction", "user_feature_strength", "item_category_strength",
                "drift_strength", "drift_popularity_shuffle")
        for name in unit:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"SimulatorConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.explore_fraction + self.fresh_fraction > 1.0:
            raise ConfigError("SimulatorConfig.explore_fraction + fresh_fraction must not exceed 1")
        if not 0.0 < self.target_ctr < 1.0:
            raise ConfigError(f"SimulatorConfig.target_ctr must be in (0, 1), got {self.target_ctr}")
        if self.drift_every is not None and self.drift_every < 1:
            raise ConfigError(f"SimulatorConfig.drift_every must be >= 1 or None, got {self.drift_every}")
        if any(n < 0 for n in self.drift_at):
            raise ConfigError(f"SimulatorConfig.drift_at must hold event counts >= 0, got {self.drift_at}")
        nonneg = ("zipf_exponent", "position_decay", "new_item_rate", "start_time", "fresh_window")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"SimulatorConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.event_rate <= 0:
            raise ConfigError(f"SimulatorConfig.event_rate must be > 0 events/s, got {self.event_rate}")


class DriftPoint(NamedTuple):
    """Where a drift took effect: events emitted before it, and the simulated time."""

    event_count: int
    event_time: float


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class ClickSimulator:
    """A deterministic, non-stationary click stream with known click probabilities.

    Parameters
    ----------
    config
        The :class:`SimulatorConfig`; stored as ``self.config``.

    Attributes
    ----------
    drift_points
        A :class:`DriftPoint` per drift that took effect so far.
    new_item_first_seen
        Item id -> event time of the first impression of each item that arrived
        mid-stream (initial catalogue items are not listed).
    base_logit
        The click model's ``base`` (calibrated or given).

    Notes
    -----
    One simulator is one stream: :meth:`events` continues where the previous call
    stopped. The ground-truth accessors describe the world as it is when the event
    being consumed was generated (drifts and arrivals happen between batches, only
    after every event of the previous batch was yielded).
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        cfg = self.config
        world_ss, stream_ss, calib_ss = np.random.SeedSequence(cfg.seed).spawn(3)
        self._wrng = np.random.default_rng(world_ss)
        self._rng = np.random.default_rng(stream_ss)
        self.drift_points: list[DriftPoint] = []
        self.new_item_first_seen: dict[str, float] = {}
        self._count = 0  # events generated so far
        self._count_before_batch = 0
        self._requests = 0
        self._pending: deque[Event] = deque()
        self._examine = 1.0 / (1.0 + np.arange(cfg.slate_size)) ** cfg.position_decay
        self._scale = math.sqrt(cfg.dim)
        self._build_users()
        self._build_items()
        self._drift_every_next = cfg.drift_every
        self._drift_at = sorted(set(cfg.drift_at))
        self._drift_at_i = 0
        if cfg.base_logit is None:
            self.base_logit = self._calibrate(np.random.default_rng(calib_ss))
        else:
            self.base_logit = float(cfg.base_logit)

    # ------------------------------------------------------------------ world
    def _segment_factors(self, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        d = cfg.dim
        age = rng.standard_normal((len(AGE_BUCKETS), d))
        gender = rng.standard_normal((len(GENDERS), d))
        region = rng.standard_normal((len(REGIONS), d))
        activity = 0.5 * rng.standard_normal((len(ACTIVITY_LEVELS), d))
        seg = age[self._u_age] + gender[self._u_gender] + region[self._u_region] + activity[self._u_activity]
        f = cfg.user_feature_strength
        noise = _unit_rows(rng.standard_normal((cfg.n_users, d)))
        return _unit_rows(math.sqrt(f) * _unit_rows(seg) + math.sqrt(1.0 - f) * noise)

    def _build_users(self) -> None:
        cfg, rng = self.config, self._wrng
        n = cfg.n_users
        self._u_age = rng.choice(len(AGE_BUCKETS), size=n, p=_AGE_P)
        self._u_gender = rng.integers(0, len(GENDERS), size=n)
        self._u_region = rng.choice(len(REGIONS), size=n, p=_REGION_P)
        self._u_activity = rng.choice(len(ACTIVITY_LEVELS), size=n, p=_ACTIVITY_P)
        self._U = self._segment_factors(rng)
        rate = _ACTIVITY_RATE[self._u_activity]
        self._user_cdf = np.cumsum(rate) / rate.sum()
        self._user_ids = [f"u{j}" for j in range(n)]
        self._user_feats = [
            {"age": AGE_BUCKETS[a], "gender": GENDERS[g], "region": REGIONS[r], "activity": ACTIVITY_LEVELS[t]}
            for a, g, r, t in zip(self._u_age.tolist(), self._u_gender.tolist(),
                                  self._u_region.tolist(), self._u_activity.tolist())
        ]
        # Feature interactions of the click model: fixed for the whole stream.
        self._age_cat = rng.standard_normal((len(AGE_BUCKETS), cfg.n_categories))
        self._act_price = rng.standard_normal((len(ACTIVITY_LEVELS), len(PRICE_BUCKETS)))

    def _build_items(self) -> None:
        cfg, rng = self.config, self._wrng
        self._cat_vec = rng.standard_normal((cfg.n_categories, cfg.dim))
        self._tag_vec = rng.standard_normal((cfg.n_tags, cfg.dim))
        self._cat_tags = rng.integers(0, cfg.n_tags, size=(cfg.n_categories, _TAGS_PER_CATEGORY))
        cap = max(16, 2 * cfg.n_items)
        self._V = np.zeros((cap, cfg.dim))
        self._i_cat = np.zeros(cap, dtype=np.int64)
        self._i_price = np.zeros(cap, dtype=np.int64)
        self._i_rank = np.zeros(cap)
        self._item_ids: list[str] = []
        self._item_feats: list[dict] = []
        self._n_items = 0
        self._n_initial = cfg.n_items
        self._add_items(cfg.n_items, rng, ranks=rng.permutation(cfg.n_items) + 1.0)
        self._refresh_popularity()

    def _add_items(self, k: int, rng: np.random.Generator, ranks: np.ndarray) -> None:
        cfg = self.config
        start, end = self._n_items, self._n_items + k
        if end > len(self._V):
            cap = max(2 * len(self._V), end)
            self._V = np.concatenate([self._V, np.zeros((cap - len(self._V), cfg.dim))])
            for name in ("_i_cat", "_i_price", "_i_rank"):
                arr = getattr(self, name)
                setattr(self, name, np.concatenate([arr, np.zeros(cap - len(arr), dtype=arr.dtype)]))
        cats = rng.integers(0, cfg.n_categories, size=k)
        prices = rng.choice(len(PRICE_BUCKETS), size=k, p=_PRICE_P)
        n_tags = rng.integers(1, 4, size=k)
        own = rng.random((k, 3)) < 0.7
        own_pick = rng.integers(0, _TAGS_PER_CATEGORY, size=(k, 3))
        any_pick = rng.integers(0, cfg.n_tags, size=(k, 3))
        tags = np.where(own, self._cat_tags[cats[:, None], own_pick], any_pick)
        content = self._cat_vec[cats].copy()
        for j in range(k):
            chosen = sorted(set(tags[j, : n_tags[j]].tolist()))
            content[j] += 0.5 * self._tag_vec[chosen].mean(axis=0)
            self._item_ids.append(f"i{start + j}")
            self._item_feats.append({
                "category": f"c{cats[j]}",
                "tags": tuple(f"t{t}" for t in chosen),
                "price": PRICE_BUCKETS[prices[j]],
            })
        g = cfg.item_category_strength
        noise = _unit_rows(rng.standard_normal((k, cfg.dim)))
        self._V[start:end] = _unit_rows(math.sqrt(g) * _unit_rows(content) + math.sqrt(1.0 - g) * noise)
        self._i_cat[start:end] = cats
        self._i_price[start:end] = prices
        self._i_rank[start:end] = ranks
        self._n_items = end

    def _refresh_popularity(self) -> None:
        n = self._n_items
        ranks = self._i_rank[:n]
        w = ranks ** -self.config.zipf_exponent
        self._pop_cdf = np.cumsum(w) / w.sum()
        self._pop_term = 1.0 - 2.0 * np.clip(np.log(ranks) / math.log(max(self._n_initial, 2)), 0.0, 1.0)

    # ------------------------------------------------------------- click model
    def _logits(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Click logits without ``base`` for broadcastable index arrays."""
        cfg = self.config
        dot = np.einsum("...d,...d->...", self._U[users], self._V[items])
        inter = self._age_cat[self._u_age[users], self._i_cat[items]] + \
            self._act_price[self._u_activity[users], self._i_price[items]]
        return (cfg.affinity_weight * self._scale * dot + cfg.popularity_weight * self._pop_term[items]
                + cfg.interaction_weight * inter / math.sqrt(2.0))

    def _probabilities(self, users: np.ndarray, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
        examine = 1.0 / (1.0 + positions) ** self.config.position_decay
        return examine * _sigmoid(self.base_logit + self._logits(users, items))

    def _calibrate(self, rng: np.random.Generator, n: int = 20_000) -> float:
        cfg = self.config
        users = np.searchsorted(self._user_cdf, rng.random(n), side="right")
        pop = np.searchsorted(self._pop_cdf, rng.random(n), side="right")
        uniform = rng.integers(0, self._n_items, size=n)
        items = np.where(rng.random(n) < cfg.explore_fraction + cfg.fresh_fraction, uniform, pop)
        positions = rng.integers(0, cfg.slate_size, size=n)
        examine = self._examine[positions]
        if cfg.target_ctr >= examine.mean():
            raise ConfigError(
                f"target_ctr {cfg.target_ctr} is out of reach: with position_decay {cfg.position_decay} "
                f"and slate_size {cfg.slate_size} at most {examine.mean():.3f} of impressions are examined"
            )
        s = self._logits(users, items)
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if float(np.mean(examine * _sigmoid(mid + s))) < cfg.target_ctr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    # ------------------------------------------------------------ ground truth
    def _user_index(self, user_id: str) -> int:
        j = int(user_id[1:]) if user_id[:1] == "u" and user_id[1:].isdigit() else -1
        if not 0 <= j < self.config.n_users:
            raise KeyError(f"unknown user id {user_id!r} (this simulator has u0..u{self.config.n_users - 1})")
        return j

    def _item_index(self, item_id: str) -> int:
        j = int(item_id[1:]) if item_id[:1] == "i" and item_id[1:].isdigit() else -1
        if not 0 <= j < self._n_items:
            raise KeyError(f"unknown item id {item_id!r} (the catalogue holds i0..i{self._n_items - 1} so far)")
        return j

    def true_click_probability(self, user_id: str, item_id: str, position: int = 0) -> float:
        """P(click) of ``user_id`` shown ``item_id`` at ``position``, under the current world.

        ``position=0`` gives the item's relevance alone (examination probability 1).
        Raises ``KeyError`` for an id the simulator does not know (yet).
        """
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        p = self._probabilities(np.array(self._user_index(user_id)), np.array(self._item_index(item_id)),
                                np.array(float(position)))
        return float(p)

    def true_click_probabilities(self, user_ids: list[str], item_ids: list[str],
                                 positions: list[int] | np.ndarray) -> np.ndarray:
        """Vectorised :meth:`true_click_probability`: arrays of shape (N,) in, (N,) out."""
        users = np.array([self._user_index(u) for u in user_ids], dtype=np.int64)
        items = np.array([self._item_index(i) for i in item_ids], dtype=np.int64)
        pos = np.asarray(positions, dtype=float)
        if pos.shape != users.shape or items.shape != users.shape:
            raise ValueError("user_ids, item_ids and positions must have the same length")
        if np.any(pos < 0):
            raise ValueError("positions must be >= 0")
        return self._probabilities(users, items, pos)

    def user_features(self, user_id: str) -> dict:
        """The side features of a user (a fresh dict)."""
        return dict(self._user_feats[self._user_index(user_id)])

    def item_features(self, item_id: str) -> dict:
        """The side features of an item (a fresh dict)."""
        return dict(self._item_feats[self._item_index(item_id)])

    def item_ids(self) -> list[str]:
        """Ids of the catalogue so far (initial items, then arrivals in order)."""
        return list(self._item_ids)

    @property
    def n_items(self) -> int:
        """Current catalogue size (grows as new items arrive)."""
        return self._n_items

    @property
    def events_generated(self) -> int:
        """Events generated so far (a few may still wait to be yielded)."""
        return self._count

    # ---------------------------------------------------------------- dynamics
    def _next_drift(self) -> int | None:
        at = self._drift_at[self._drift_at_i] if self._drift_at_i < len(self._drift_at) else None
        every = self._drift_every_next
        candidates = [n for n in (at, every) if n is not None]
        return min(candidates) if candidates else None

    def _drift(self) -> None:
        cfg, rng = self.config, self._rng
        self.drift_points.append(DriftPoint(self._count, self._time(self._count)))
        m = cfg.drift_strength
        self._U = _unit_rows((1.0 - m) * self._U + m * self._segment_factors(rng))
        n = self._n_items
        k = int(round(cfg.drift_popularity_shuffle * n))
        if k > 1:
            idx = rng.choice(n, size=k, replace=False)
            self._i_rank[idx] = self._i_rank[rng.permutation(idx)]
            self._refresh_popularity()

    def _apply_due_drifts(self) -> None:
        while (nxt := self._next_drift()) is not None and self._count >= nxt:
            if self._drift_at_i < len(self._drift_at) and self._drift_at[self._drift_at_i] == nxt:
                self._drift_at_i += 1
            if self._drift_every_next == nxt:
                self._drift_every_next += self.config.drift_every
            self._drift()

    def _arrivals(self, n_events: int) -> None:
        """New items arriving while ``n_events`` events happened (the previous batch)."""
        expected = self.config.new_item_rate * n_events
        k = int(self._rng.poisson(expected)) if expected > 0 else 0
        if k:
            ranks = self._rng.integers(1, self._n_items + 1, size=k).astype(float)
            self._add_items(k, self._rng, ranks)
            self._refresh_popularity()

    def _time(self, index: int) -> float:
        return self.config.start_time + index / self.config.event_rate

    def _draw_slates(self, r: int) -> np.ndarray:
        cfg, rng = self.config, self._rng
        s, n = cfg.slate_size, self._n_items
        width = 2 * s
        src = rng.random((r, width))
        cand = np.searchsorted(self._pop_cdf, rng.random((r, width)), side="right")
        uniform = rng.integers(0, n, size=(r, width))
        n_fresh = min(cfg.fresh_window, n - self._n_initial)
        fresh_cut = cfg.explore_fraction + (cfg.fresh_fraction if n_fresh > 0 else 0.0)
        cand = np.where(src < fresh_cut, uniform, cand)
        if n_fresh > 0:
            fresh = n - 1 - rng.integers(0, n_fresh, size=(r, width))
            cand = np.where((src >= cfg.explore_fraction) & (src < fresh_cut), fresh, cand)
        slates = np.empty((r, s), dtype=np.int64)
        for j, row in enumerate(cand.tolist()):
            picked = list(dict.fromkeys(row))[:s]
            while len(picked) < s:  # rare: the head of the popularity curve repeated itself
                extra = int(rng.integers(0, n))
                if extra not in picked:
                    picked.append(extra)
            slates[j] = picked
        return slates

    def _generate_batch(self) -> list[Event]:
        cfg, rng = self.config, self._rng
        self._apply_due_drifts()
        self._arrivals(self._count - self._count_before_batch)
        self._count_before_batch = self._count
        r, s = cfg.batch_requests, cfg.slate_size
        users = np.searchsorted(self._user_cdf, rng.random(r), side="right")
        slates = self._draw_slates(r)
        p = self._examine[None, :] * _sigmoid(self.base_logit + self._logits(users[:, None], slates))
        clicks = rng.random((r, s)) < p
        n_events = 1 + s + clicks.sum(axis=1)
        starts = self._count + np.concatenate([[0], np.cumsum(n_events)[:-1]])
        nxt = self._next_drift()
        if nxt is not None:
            r = max(1, int(np.searchsorted(starts, nxt, side="left")))  # stop at the drift boundary

        seed, first_new = cfg.seed, self._n_initial
        dt, t0 = 1.0 / cfg.event_rate, cfg.start_time
        out: list[Event] = []
        n = self._count
        for j, u, slate, clicked in zip(range(r), users.tolist(), slates.tolist(), clicks.tolist()):
            uid, uf = self._user_ids[u], self._user_feats[u]
            rid = f"s{seed}-r{self._requests}"
            self._requests += 1
            out.append(Event(kind="request", event_id=f"s{seed}-{n}", event_time=t0 + n * dt, user_id=uid,
                             request_id=rid, user_features=dict(uf), k=s))
            n += 1
            for pos, (item, c) in enumerate(zip(slate, clicked)):
                iid = self._item_ids[item]
                if item >= first_new and iid not in self.new_item_first_seen:
                    self.new_item_first_seen[iid] = t0 + n * dt
                out.append(Event(kind="impression", event_id=f"s{seed}-{n}", event_time=t0 + n * dt,
                                 user_id=uid, request_id=rid, user_features=dict(uf), item_id=iid,
                                 item_features=dict(self._item_feats[item]), label=int(c), position=pos))
                n += 1
            for pos, (item, c) in enumerate(zip(slate, clicked)):
                if c:
                    out.append(Event(kind="click", event_id=f"s{seed}-{n}", event_time=t0 + n * dt,
                                     user_id=uid, request_id=rid, user_features=dict(uf),
                                     item_id=self._item_ids[item], item_features=dict(self._item_feats[item]),
                                     label=1, position=pos))
                    n += 1
        self._count = n
        return out

    # ------------------------------------------------------------------ stream
    def events(self, max_events: int | None = None) -> Iterator[Event]:
        """Yield events (forever, or ``max_events`` of them), continuing the stream."""
        if max_events is not None and max_events < 0:
            raise ValueError(f"max_events must be >= 0, got {max_events}")
        emitted = 0
        pending = self._pending
        while max_events is None or emitted < max_events:
            if not pending:
                pending.extend(self._generate_batch())
            yield pending.popleft()
            emitted += 1

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def __repr__(self) -> str:
        return f"ClickSimulator({self.config!r})"
