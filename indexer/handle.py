"""Index handles and the hot swap: build fully, swap one reference.

An :class:`IndexHandle` is frozen: the FAISS index, its id map, its version and its
manifest travel together and are loaded completely before anyone can see them. An
:class:`IndexHolder` holds the served handle; :meth:`IndexHolder.swap` is a single
reference assignment, and :meth:`IndexHolder.search` reads that reference once, so an
answer always pairs one index with its own id map and reports that handle's version.

A replaced handle is retired, not dropped: :meth:`IndexHolder.reap` frees it once no
query references it, releasing the GIL while the memory goes back to the kernel, so
neither a query thread nor the swapping thread stalls the others on a large free.

>>> import faiss, numpy as np
>>> def handle(version, ids):
...     index = faiss.IndexFlatIP(2); index.add(np.eye(2, dtype="float32"))
...     return IndexHandle(index, np.array(ids), version, {})
>>> holder = IndexHolder(handle(1, ["a", "b"]))
>>> holder.search(np.array([[0.0, 1.0]], dtype="float32"), k=1).ids.tolist()
[['b']]
>>> holder.swap(handle(2, ["c", "d"]), reap=False)
1
>>> r = holder.search(np.array([[0.0, 1.0]], dtype="float32"), k=1)
>>> r.version, r.ids.tolist()
(2, [['d']])
>>> holder.reap()
1
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import faiss
import numpy as np
import orjson

from indexer._release import destroy_index, release_array_memory
from indexer.artifacts import IDS_FILE, INDEX_FILE, MANIFEST_FILE, verify_file
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
    delta_seq
        The item-log sequence applied on top of that version (0: the published base
        alone; see :mod:`indexer.delta`).
    """

    ids: np.ndarray
    scores: np.ndarray
    version: int
    delta_seq: int = 0


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

    @cached_property
    def rows(self) -> dict[str, int]:
        """Item id -> FAISS label, built on first use (item deltas mask base items by it)."""
        return {item: row for row, item in enumerate(self.ids.tolist())}

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
            if name in (INDEX_FILE, IDS_FILE):
                verify_file(path / name, expected)
    index = faiss.read_index(str(path / INDEX_FILE))
    apply_search_params(index, manifest.get("index", {}).get("params", {}))
    with (path / IDS_FILE).open("rb") as fh:
        ids = np.load(fh, allow_pickle=False)
    return IndexHandle(index=index, ids=ids, version=int(manifest["version"]), manifest=manifest, path=path)


def _base_of(handle: object) -> object:
    """The published handle that owns the FAISS index (a delta handle's ``base``)."""
    return getattr(handle, "base", handle)


class IndexHolder:
    """Holds the served :class:`IndexHandle`; swapped by one reference assignment.

    Retired handles are kept until no query uses them any more, then :meth:`reap` frees
    them without holding the GIL (see :mod:`indexer._release`): a large index must never
    be freed by a plain ``del`` next to running queries (30-110 ms of GIL at 1M items).

    Parameters
    ----------
    handle
        The initial handle, or None (searches raise :class:`NoIndexError` until a swap).
    """

    # References to a retired handle inside reap(): the list slot, the loop variable and
    # getrefcount's argument. More means a query (or a caller) still holds it.
    _UNREFERENCED = 3

    def __init__(self, handle: IndexHandle | None = None) -> None:
        self._handle = handle
        self._retired: list[IndexHandle] = []
        self._swap_lock = threading.Lock()  # serialises writers only; readers never take it
        self.swaps = 0
        self.reaped = 0

    @property
    def current(self) -> IndexHandle | None:
        """The served handle (one reference read)."""
        return self._handle

    @property
    def version(self) -> int | None:
        """The served version, or None."""
        h = self._handle
        return None if h is None else h.version

    @property
    def retired(self) -> int:
        """Replaced handles not freed yet."""
        return len(self._retired)

    def swap(self, handle: IndexHandle, *, reap: bool = True) -> int | None:
        """Serve ``handle`` from now on; returns the version it replaced (or None).

        Queries never wait: the swap is one reference assignment. The replaced handle is
        retired, not dropped. With ``reap`` (default) the handles retired earlier that
        no query holds any more are freed right after the swap, on this thread; the one
        just replaced usually still has queries in flight and waits for the next
        :meth:`reap` (the watcher calls it after every poll).
        """
        with self._swap_lock:
            previous = self._handle
            self._handle = handle  # the swap: one reference assignment
            if previous is not None:
                self._retired.append(previous)
            self.swaps += 1
        old = None if previous is None else previous.version
        del previous
        log.info("index swapped: version %s -> %s", old, handle.version)
        if reap:
            self.reap()
        return old

    def swap_if(self, expected: object, handle: object) -> bool:
        """Swap in ``handle`` only if ``expected`` is still served (compare-and-swap).

        For the item-delta follower: a delta built on the served handle must not replace
        a version the watcher swapped in meanwhile. The replaced handle is retired.
        """
        with self._swap_lock:
            if self._handle is not expected:
                return False
            if self._handle is not None:
                self._retired.append(self._handle)
            self._handle = handle
            self.swaps += 1
        return True

    def reap(self) -> int:
        """Free the retired handles no one references any more; returns how many.

        Safe at any time: a handle a query still searches keeps a reference and waits
        for a later call.
        """
        with self._swap_lock:
            free, keep = [], []
            for h in self._retired:
                (free if sys.getrefcount(h) <= self._UNREFERENCED else keep).append(h)
            self._retired = keep
            # A delta handle (indexer.delta) shares its base's FAISS index with the handles
            # before and after it: a base is freed only once no served or still-referenced
            # handle is built on it.
            in_use = {id(_base_of(h)) for h in keep}
            if self._handle is not None:
                in_use.add(id(_base_of(self._handle)))
            bases = {id(b): b for b in (_base_of(h) for h in free) if id(b) not in in_use}
        for b in bases.values():
            destroy_index(b.index)  # C++ delete, GIL released; the handle is unreachable
            release_array_memory(b.ids)
        n = len(free)
        self.reaped += n
        del free  # what is left to free is small
        return n

    def search(self, user_vecs: np.ndarray, k: int) -> SearchResult:
        """Search the served handle; the answer reports the version that produced it."""
        handle = self._handle  # read once: index, ids and version all come from it
        if handle is None:
            raise NoIndexError("no index loaded yet: publish a version (`towerstream index build-once`) first")
        return handle.search(user_vecs, k)
