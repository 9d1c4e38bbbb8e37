"""Index handles and the hot swap: build fully, swap one reference.

An :class:`IndexHandle` is frozen: the FAISS index, its id map, its version and its
manifest travel together and are loaded completely before anyone can see them. An
:class:`IndexHolder` holds the served handle; :meth:`IndexHolder.swap` is a single
reference assignment, and :meth:`IndexHolder.search` reads that reference once, so an
answer always pairs one index with its own id map and reports that handle's version.

The holder keeps the previous handle alive until the next swap: a query still running
on it when the swap happens never ends up freeing a large index on the query thread.

>>> import faiss, numpy as np
>>> def handle(version, ids):
...     index = faiss.IndexFlatIP(2); index.add(np.eye(2, dtype="float32"))
...     return IndexHandle(index, np.array(ids), version, {})
>>> holder = IndexHolder(handle(1, ["a", "b"]))
>>> holder.search(np.array([[0.0, 1.0]], dtype="float32"), k=1).ids.tolist()
[['b']]
>>> old = holder.swap(handle(2, ["c", "d"]))
>>> r = holder.search(np.array([[0.0, 1.0]], dtype="float32"), k=1)
>>> r.version, r.ids.tolist()
(2, [['d']])
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import faiss
import numpy as np
import orjson

from indexer.artifacts import IDS_FILE, INDEX_FILE, MANIFEST_FILE, file_digest
from indexer.build import apply_search_params
from indexer.errors import ArtifactError, NoIndexError

__all__ = ["IndexHandle", "IndexHolder", "SearchResult", "load_handle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    """Top-k answers of one search, all from one handle.

    Attributes
    ----------
    ids
        Item ids, shape (B, k), numpy unicode; ``""`` where fewer than k were found.
    scores
        Inner products, shape (B, k) float32, best first; ``-inf`` where none.
    version
        The version of the handle that answered.
    """

    ids: np.ndarray
    scores: np.ndarray
    version: int


@dataclass(frozen=True, eq=False)
class IndexHandle:
    """One loaded index version: FAISS index + id map + version + manifest.

    Attributes
    ----------
    index
        FAISS index with search parameters set; label ``i`` is ``ids[i]``.
    ids
        Item ids, shape (N,).
    version
        Version number.
    manifest
        The version's manifest (empty for handles built in memory).
    path
        The version directory it was loaded from, if any.
    """

    index: faiss.Index
    ids: np.ndarray
    version: int
    manifest: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.ids) != self.index.ntotal:
            raise ArtifactError(
                f"version {self.version}: id map has {len(self.ids)} ids but the index holds "
                f"{self.index.ntotal} vectors"
            )

    @property
    def size(self) -> int:
        """Number of indexed items."""
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Vector dimension D."""
        return int(self.index.d)

    def search(self, user_vecs: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` items for each user vector, shape (B, D) -> (B, k)."""
        queries = np.ascontiguousarray(np.atleast_2d(user_vecs), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"user vectors have dimension {queries.shape[1]}, the index {self.dim}")
        scores, labels = self.index.search(queries, k)
        missing = labels < 0
        ids = self.ids[np.where(missing, 0, labels)] if self.size else np.full(labels.shape, "", dtype="<U1")
        if missing.any():
            ids = np.where(missing, "", ids)
            scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return SearchResult(ids=ids, scores=scores, version=self.version)


def load_handle(path: str | Path, *, verify: bool = True) -> IndexHandle:
    """Load a version directory completely into memory.

    Parameters
    ----------
    path
        A version directory (``root/versions/vNNNNNNNN``).
    verify
        Check file sizes and sha256 against the manifest first.

    Raises
    ------
    ArtifactError
        If a file is missing, does not match the manifest, or the counts disagree.
    """
    path = Path(path)
    try:
        manifest = orjson.loads((path / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{path} has no {MANIFEST_FILE}: not a complete index version") from None
    if verify:
        for name, expected in manifest.get("files", {}).items():
            if name not in (INDEX_FILE, IDS_FILE):
                continue
            try:
                actual = file_digest(path / name)
            except FileNotFoundError:
                raise ArtifactError(f"{path / name} is missing") from None
            if actual != expected:
                raise ArtifactError(f"{path / name} does not match its manifest (size/sha256); re-publish it")
    index = faiss.read_index(str(path / INDEX_FILE))
    apply_search_params(index, manifest.get("index", {}).get("params", {}))
    with (path / IDS_FILE).open("rb") as fh:
        ids = np.load(fh, allow_pickle=False)
    return IndexHandle(index=index, ids=ids, version=int(manifest["version"]), manifest=manifest, path=path)


class IndexHolder:
    """Holds the served :class:`IndexHandle`; swapped by one reference assignment.

    Parameters
    ----------
    handle
        The initial handle, or None (searches raise :class:`NoIndexError` until a swap).
    """

    def __init__(self, handle: IndexHandle | None = None) -> None:
        self._handle = handle
        self._retired: IndexHandle | None = None
        self._swap_lock = threading.Lock()  # serialises writers only; readers never take it
        self.swaps = 0

    @property
    def current(self) -> IndexHandle | None:
        """The served handle (one reference read)."""
        return self._handle

    @property
    def version(self) -> int | None:
        """The served version, or None."""
        h = self._handle
        return None if h is None else h.version

    def swap(self, handle: IndexHandle) -> IndexHandle | None:
        """Serve ``handle`` from now on; returns the handle it replaced.

        The replaced handle stays referenced until the next swap, so the one before it
        is freed here, on the swapping thread, not on a query thread.
        """
        with self._swap_lock:
            previous = self._handle
            self._handle = handle  # the swap: one reference assignment
            freed, self._retired = self._retired, previous
            self.swaps += 1
        del freed
        log.info("index swapped: version %s -> %s", None if previous is None else previous.version, handle.version)
        return previous

    def search(self, user_vecs: np.ndarray, k: int) -> SearchResult:
        """Search the served handle; the answer reports the version that produced it."""
        handle = self._handle  # read once: index, ids and version all come from it
        if handle is None:
            raise NoIndexError("no index loaded yet: publish a version (`towerstream index build-once`) first")
        return handle.search(user_vecs, k)
