"""Two-tower learners for pre-ranking and retrieval: plain two-tower, IntTower and DAT.

``model`` (the network, returning embeddings), ``losses`` (apart from the model),
``features`` (collisionless id tables), ``updater`` (the streaming learner: optimizer,
micro-batches, clock) and ``offline`` (the papers' offline protocol on the same code).

:mod:`learners.registry` builds ``two-tower``, ``inttower`` and ``dat`` through
:func:`make` (``"learners.two_tower:make"`` with the name bound). Importing this package
imports nothing heavy: torch is loaded when a public name below is first used.

>>> from learners.registry import make_learner
>>> make_learner("inttower", seed=3).spec["params"]["fe"]
True
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "EmbeddingStore",
    "FeatureEncoder",
    "ModelConfig",
    "TowerOutput",
    "TwoTowerModel",
    "TwoTowerLearner",
    "PRESETS",
    "make",
    "two_tower",
    "inttower",
    "dat",
]

_LAZY = {
    "EmbeddingStore": "learners.two_tower.features",
    "FeatureEncoder": "learners.two_tower.features",
    "ModelConfig": "learners.two_tower.model",
    "TowerOutput": "learners.two_tower.model",
    "TwoTowerModel": "learners.two_tower.model",
    "TwoTowerLearner": "learners.two_tower.updater",
    "PRESETS": "learners.two_tower.updater",
    "make": "learners.two_tower.updater",
    "two_tower": "learners.two_tower.updater",
    "inttower": "learners.two_tower.updater",
    "dat": "learners.two_tower.updater",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'learners.two_tower' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

