"""Item vectors at rest: freeze a checkpoint's item tower, embed the catalogue, build a
FAISS index, guard it, publish it atomically as a version, announce it, hot-swap it.

Builder side: :class:`IndexerService` (with :class:`Catalogue`, :class:`ArtifactStore`,
:class:`Guardrail`, :class:`Announcer`, :class:`StreamFollower`). Scorer side:
:class:`IndexHolder` + :class:`IndexWatcher` (or :func:`load_handle` and
:func:`latest_announcement` by hand).
"""

from indexer.announce import Announcement, Announcer, ensure_control_topic, latest_announcement
from indexer.artifacts import ArtifactStore, VersionInfo
from indexer.build import BuildConfig, BuildResult, TrainedState, build_index, choose_kind, recall_at_k
from indexer.catalogue import Catalogue, CatalogueSnapshot, item_x
from indexer.errors import ArtifactError, BuildError, CatalogueError, IndexerError, NoIndexError
from indexer.follow import RecentWindow, StreamFollower
from indexer.guardrail import Guardrail, GuardrailConfig, GuardrailDecision, TwoTowerEncoder, retrieval_auc, roc_auc
from indexer.handle import IndexHandle, IndexHolder, SearchResult, load_handle
from indexer.service import (
    BuildOutcome,
    CheckpointSource,
    FileCheckpointSource,
    FrozenModel,
    IndexerMetrics,
    IndexerService,
)
from indexer.watcher import IndexWatcher

__all__ = [
    "Announcement",
    "Announcer",
    "ArtifactError",
    "ArtifactStore",
    "BuildConfig",
    "BuildError",
    "BuildOutcome",
    "BuildResult",
    "Catalogue",
    "CatalogueError",
    "CatalogueSnapshot",
    "CheckpointSource",
    "FileCheckpointSource",
    "FrozenModel",
    "Guardrail",
    "GuardrailConfig",
    "GuardrailDecision",
    "IndexHandle",
    "IndexHolder",
    "IndexWatcher",
    "IndexerError",
    "IndexerMetrics",
    "IndexerService",
    "NoIndexError",
    "RecentWindow",
    "SearchResult",
    "StreamFollower",
    "TrainedState",
    "TwoTowerEncoder",
    "VersionInfo",
    "build_index",
    "choose_kind",
    "ensure_control_topic",
    "item_x",
    "latest_announcement",
    "load_handle",
    "recall_at_k",
    "retrieval_auc",
    "roc_auc",
]
