"""Answers: retrieval + pre-ranking, the request consumer, HTTP, Prometheus metrics.

The scorer (:class:`Scorer`) takes one model handle and one index handle per request
(batch), so every answer comes from one model version and one index version.
:class:`RequestConsumer` serves request events from Kafka, :mod:`serving.http` serves
HTTP, :class:`OnlineEvaluator` joins what was served with impressions and clicks, and
:mod:`serving.metrics` names every Prometheus metric. :class:`ServingApp` wires them
into the ``towerstream serve`` process.
"""

from serving.errors import BadRequestError, NotReadyError, ServingError
from serving.metrics import IndexerStatsCollector, LearnerStatsCollector, Metrics, start_metrics_server
from serving.online_eval import OnlineEvalConfig, OnlineEvaluator
from serving.scorer import (
    CheckpointLearnerSource,
    ItemFeatureStore,
    LearnerSource,
    ModelHandle,
    RankedItem,
    Ranking,
    Scorer,
    ScoreRequest,
    StaticLearnerSource,
)

__all__ = [
    "BadRequestError",
    "CheckpointLearnerSource",
    "IndexerStatsCollector",
    "ItemFeatureStore",
    "LearnerSource",
    "LearnerStatsCollector",
    "Metrics",
    "ModelHandle",
    "NotReadyError",
    "OnlineEvalConfig",
    "OnlineEvaluator",
    "RankedItem",
    "Ranking",
    "ScoreRequest",
    "Scorer",
    "ServingError",
    "StaticLearnerSource",
    "start_metrics_server",
]
