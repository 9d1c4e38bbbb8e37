"""Learner checkpoints: the model and the Kafka offsets it has learned up to, together.

A checkpoint file holds the learner's ``spec`` (``{"name", "params"}``, enough to rebuild
it through :func:`learners.registry.make_learner`), its ``state_dict``, the offsets
``{topic: {partition: next_offset}}`` of the events folded into that state, how many
events were learned, and a creation time. State and offsets are written in one file,
atomically (temporary file in the same directory, fsync, ``os.replace``, fsync of the
directory), so a reader or a restarted process sees the old checkpoint or the new one,
never half of one, and never a model without the offsets that match it.

The format is a pickle (protocol 5: numpy arrays and torch tensors go out-of-band
efficiently). Only load checkpoints you wrote yourself: unpickling runs code.

>>> import tempfile, os
>>> class Counter:
...     spec = {"name": "counter", "params": {}}
...     def __init__(self): self.n = 0
...     def state_dict(self): return {"n": self.n}
>>> c = Counter(); c.n = 3
>>> path = os.path.join(tempfile.mkdtemp(), "model.ckpt")
>>> _ = save_checkpoint(path, c, {"events": {0: 10, 1: 7}}, events_learned=17)
>>> ck = load_checkpoint(path)
>>> ck.state, ck.offsets, ck.events_learned
({'n': 3}, {'events': {0: 10, 1: 7}}, 17)
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from streams.errors import TowerstreamError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_from_bytes",
    "restore_learner",
    "same_learner",
    "nest_offsets",
    "flat_offsets",
]

CHECKPOINT_FORMAT = "towerstream-learner-checkpoint"
CHECKPOINT_VERSION = 1

Offsets = Mapping[str, Mapping[int, int]]


class CheckpointError(TowerstreamError):
    """A checkpoint is missing, unreadable, or not a towerstream learner checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint.

    Attributes
    ----------
    spec
        ``{"name": registry name, "params": constructor keyword arguments}``.
    state
        The learner's ``state_dict()``.
    offsets
        ``{topic: {partition: next_offset}}``: the first record *not* in ``state``.
    events_learned
        Training examples folded into ``state`` since the learner was created.
    created_at
        Seconds since the epoch.
    extra
        Whatever the writer added (prequential metrics, group id, ...).
    """

    spec: Mapping[str, Any]
    state: Mapping[str, Any]
    offsets: Mapping[str, Mapping[int, int]]
    events_learned: int
    created_at: float
    extra: Mapping[str, Any] = field(default_factory=dict)

    def learner(self) -> Any:
        """A new learner rebuilt from ``spec`` with ``state`` loaded."""
        return restore_learner(self)


def nest_offsets(flat: Mapping[tuple[str, int], int]) -> dict[str, dict[int, int]]:
    """``{(topic, partition): offset}`` -> ``{topic: {partition: offset}}``.

    >>> nest_offsets({("t", 1): 5, ("t", 0): 2})
    {'t': {0: 2, 1: 5}}
    """
    out: dict[str, dict[int, int]] = {}
    for (topic, partition), offset in sorted(flat.items()):
        out.setdefault(topic, {})[int(partition)] = int(offset)
    return out


def flat_offsets(nested: Offsets) -> dict[tuple[str, int], int]:
    """``{topic: {partition: offset}}`` -> ``{(topic, partition): offset}``.

    >>> flat_offsets({"t": {0: 2}})
    {('t', 0): 2}
    """
    return {(topic, int(p)): int(off) for topic, parts in nested.items() for p, off in parts.items()}


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _validate_offsets(offsets: Offsets) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for topic, parts in offsets.items():
        if not isinstance(topic, str):
            raise CheckpointError(f"offsets must be keyed by topic name, got {topic!r}")
        for p, off in parts.items():
            if not (_is_int(p) and _is_int(off)) or off < 0:
                raise CheckpointError(f"bad offset {topic}[{p!r}]={off!r}: need partition -> next offset >= 0")
            out.setdefault(topic, {})[int(p)] = int(off)
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    learner: Any,
    offsets: Offsets,
    events_learned: int,
    extra: Mapping[str, Any] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Checkpoint:
    """Write ``learner``'s spec and state with ``offsets`` to ``path``, atomically.

    ``learner`` needs ``.spec`` and ``.state_dict()``. The directory is created if needed.
    Returns the :class:`Checkpoint` written.
    """
    spec = getattr(learner, "spec", None)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise CheckpointError(
            f"{type(learner).__name__} has no .spec {{'name': ..., 'params': ...}}: build learners with "
            "learners.registry.make_learner so a checkpoint can rebuild them"
        )
    ck = Checkpoint(
        spec={"name": spec["name"], "params": dict(spec.get("params", {}))},
        state=learner.state_dict(),
        offsets=_validate_offsets(offsets),
        events_learned=int(events_learned),
        created_at=float(clock()),
        extra=dict(extra or {}),
    )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": ck.spec,
        "state": ck.state,
        "offsets": ck.offsets,
        "events_learned": ck.events_learned,
        "created_at": ck.created_at,
        "extra": ck.extra,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(payload, f, protocol=5)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return ck


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    return checkpoint_from_bytes(data, str(path))


def checkpoint_from_bytes(data: bytes, where: str = "checkpoint bytes") -> Checkpoint:
    """Parse the bytes of a checkpoint file (``where`` names them in errors).

    The indexer reads a checkpoint file once and keeps those exact bytes beside the index
    version it builds (the version's frozen tower), so both are parsed here.
    """
    try:
        payload = pickle.loads(data)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as exc:
        raise CheckpointError(f"{where} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} is not a towerstream learner checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{where} has checkpoint version {payload.get('version')!r}; this towerstream reads "
            f"version {CHECKPOINT_VERSION}"
        )
    return Checkpoint(
        spec=payload["spec"],
        state=payload["state"],
        offsets=payload["offsets"],
        events_learned=payload["events_learned"],
        created_at=payload["created_at"],
        extra=payload.get("extra", {}),
    )


def same_learner(have: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Whether a checkpoint of spec ``have`` may resume a learner of spec ``want``: same name
    and params, where a param the fresh learner leaves ``None`` (inferred from the first
    batch and then part of its spec: the two-tower's ``user_fields``/``item_fields``)
    matches whatever the checkpoint holds.

    >>> same_learner({"name": "a", "params": {"f": ("x",)}}, {"name": "a", "params": {"f": None}})
    True
    >>> same_learner({"name": "a", "params": {"f": ("x",)}}, {"name": "a", "params": {"f": ("y",)}})
    False
    """
    hp, wp = dict(have.get("params", {})), dict(want.get("params", {}))
    return (have["name"] == want["name"] and hp.keys() == wp.keys()
            and all(wp[k] is None or hp[k] == wp[k] for k in wp))


def restore_learner(checkpoint: Checkpoint) -> Any:
    """Rebuild the learner of ``checkpoint``: ``make_learner(name, **params)`` then
    ``load_state_dict(state)``."""
    from learners.registry import make_learner

    learner = make_learner(checkpoint.spec["name"], **checkpoint.spec.get("params", {}))
    learner.load_state_dict(checkpoint.state)
    return learner
