"""Models that learn from click events: the learner protocol, generations 1 and 2
(:class:`CTRLearner`, :class:`RiverLogisticRegression`, :class:`HashedLogisticRegression`),
feature hashing, prequential metrics and evaluation, the registry and the shared checks.

The two-tower learners live in :mod:`learners.two_tower` (imported on demand: torch).
"""

from learners.base import CTX_PREFIX, ITEM_PREFIX, USER_PREFIX, Learner, X, event_to_x
from learners.checks import check_learner
from learners.ctr import CTRLearner
from learners.evaluate import prequential, prequential_step, xy_from_events
from learners.hashing import DEFAULT_CROSSES, FeatureHasher, HashedBatch, stable_hash
from learners.linear import HashedLogisticRegression
from learners.metrics import PrequentialMetrics, log_loss, roc_auc
from learners.registry import available, make_learner, register
from learners.river_lr import RiverLogisticRegression

__all__ = [
    "CTX_PREFIX",
    "ITEM_PREFIX",
    "USER_PREFIX",
    "Learner",
    "X",
    "event_to_x",
    "check_learner",
    "CTRLearner",
    "prequential",
    "prequential_step",
    "xy_from_events",
    "DEFAULT_CROSSES",
    "FeatureHasher",
    "HashedBatch",
    "stable_hash",
    "HashedLogisticRegression",
    "PrequentialMetrics",
    "log_loss",
    "roc_auc",
    "available",
    "make_learner",
    "register",
    "RiverLogisticRegression",
]
