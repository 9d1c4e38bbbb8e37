"""The served model that built the served index: ``serve --model-from index``.

A two-tower retrieves by the user tower's vector against item vectors the *item* tower
made when the index version was built. Each index version keeps the exact checkpoint it
was built from (``tower.ckpt``), so the scorer can encode users, and pre-rank, with that
same model: the user vectors are in the space of the item vectors they are searched
against, the answer's ``index_version`` and ``model_version`` always belong together,
and a new version costs one model load, shared with the item-delta follower
(:func:`indexer.item_follow.version_learner`), instead of a second unpickle of a newer
checkpoint on its own schedule. The price is freshness: the pre-ranker is as old as the
index (one index period); ``--model-from checkpoint`` serves the newest learner
checkpoint instead (:class:`serving.scorer.CheckpointLearnerSource`).

The source loads a version's model in the thread that swaps the index, *before* the
swap (:meth:`VersionLearnerSource.load_for`), prepares it (its item-side cache filled
for the catalogue), and keys it by version: :meth:`~VersionLearnerSource.current`
returns the model of the version the holder serves at that instant (one dict read), so
no request pairs a new index with an old model or the reverse. A version without a
tower, or whose tower fails to load, keeps the previous model serving, and says so in
``last_error``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from indexer.item_follow import VersionLearner, version_learner
from serving.scorer import ModelHandle, prepare_before_serving
from streams.errors import TowerstreamError

__all__ = ["VersionLearnerSource"]

logger = logging.getLogger(__name__)


class VersionLearnerSource:
    """The model of the served index version (a :class:`serving.scorer.LearnerSource`).

    Parameters
    ----------
    holder
        The served index (``holder.current``: a handle with ``version``).
    load
        ``base handle -> VersionLearner | None`` (default: the version's ``tower.ckpt``,
        loaded once per process).
    prepare
        ``(model handle, base handle) -> None``, run before the version serves (e.g.
        :meth:`serving.scorer.Scorer.prepare`); an exception is logged, the model serves.
    on_load
        Called with each newly loaded model (metrics).
    keep
        Models of this many newest versions are kept (a rollback to the previous version
        finds its model loaded; a request holding an older index handle still finds one).
    """

    def __init__(self, holder: Any, *, load: Callable[[Any], VersionLearner | None] = version_learner,
                 prepare: Callable[[ModelHandle, Any], None] | None = None,
                 on_load: Callable[[ModelHandle], None] | None = None, keep: int = 2) -> None:
        self.holder = holder
        self.load = load
        self.prepare = prepare
        self.on_load = on_load
        self.keep = max(1, int(keep))
        self._models: dict[int, ModelHandle] = {}  # version -> model; replaced whole, never mutated
        self._last: ModelHandle | None = None
        self._lock = threading.Lock()  # serialises loads only; current() never takes it
        self.last_error: str | None = "no index version served yet (its model is the one served)"

    def current(self) -> ModelHandle | None:
        """The model of the version served now; the newest loaded one if that version has none."""
        handle = self.holder.current
        if handle is not None:
            model = self._models.get(handle.version)
            if model is not None:
                return model
        return self._last

    def load_for(self, base: Any) -> ModelHandle | None:
        """Load, prepare and keep the model of index version ``base`` (call before ``base``
        is swapped in, from the swapping thread). Returns it, or None if ``base`` has none
        (the previous model goes on serving)."""
        version = base.version
        with self._lock:
            model = self._models.get(version)
            if model is not None:
                return model
            try:
                loaded = self.load(base)
            except (TowerstreamError, OSError) as exc:
                self.last_error = f"could not load the model of index version {version}: {exc}"
                logger.error("%s; still serving %s", self.last_error, None if self._last is None else
                             self._last.version)
                return None
            if loaded is None:
                self.last_error = (f"index version {version} keeps no model (tower.ckpt): serve with "
                                   "--model-from checkpoint --checkpoint PATH")
                logger.warning("%s", self.last_error)
                return None
            model = ModelHandle(learner=loaded.learner, name=loaded.name, version=loaded.events_learned,
                                created_at=loaded.created_at, path=loaded.path)
            if self.prepare is not None:
                prepare_before_serving(self.prepare, model, base)
            models = dict(self._models)
            models[version] = model
            while len(models) > self.keep:  # the least recently loaded go first
                del models[next(iter(models))]
            self._models = models  # one reference swap
            self._last = model
            self.last_error = None
        logger.info("loaded model %s (%d events learned) of index version %s", model.name, model.version, version)
        if self.on_load is not None:
            self.on_load(model)
        return model

    def start(self) -> "VersionLearnerSource":
        """Nothing to poll: models load with the index versions (:meth:`load_for`)."""
        return self

    def stop(self) -> None:
        """Nothing runs in the background."""
