"""Free a retired index without stalling the query threads.

Dropping the last reference to a large FAISS index runs its C++ destructor from
Python's deallocator with the GIL held, and the kernel work of unmapping hundreds of
megabytes blocks the other threads too: at 1M x 64-d vectors a plain ``del`` stalled a
concurrent query by 10-37 ms (median / p90, ``benchmarks/bench_index.py``'s probe; the
swap-pause target is 1 ms). Deleting the index in C++ with the GIL released alone does
not help (14 / 36 ms): the cost is the page freeing. So the reaper

* first gives the pages of the big buffers (vectors, inverted lists, HNSW graph, the
  numpy id map) back with ``madvise(MADV_DONTNEED)`` (``ctypes`` calls release the GIL,
  and madvise takes the address-space lock for reading only), a few lists at a time
  with real sleeps in between so a waiting query thread gets the GIL at once;
* then hands the emptied index to a throw-away ``IndexShards`` whose ``remove_shard``
  deletes it in C++ (FAISS's wrappers release the GIL around the call).

Measured the same way: 1.7 / 5.5 ms (median / p90) on the shared 2-core machine, the
reap itself taking ~130 ms of background time. Below 64 MB of vectors a plain free is
cheaper (0.26 / 1.5 ms at 100k items) and is what happens. Only call these on objects no one can
reach any more: the index proxy is left dangling, the contents are gone.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import time
from typing import Any

import faiss
import numpy as np

__all__ = ["destroy_index", "drop_index_pages", "release_array_memory"]

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MIN_BYTES = 1 << 20  # below a megabyte freeing is cheap anyway

_madvise: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)  # CDLL calls release the GIL
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _madvise = None


def _drop_pages(address: int, nbytes: int, min_bytes: int = _MIN_BYTES) -> int:
    """``madvise(MADV_DONTNEED)`` the whole pages inside [address, address + nbytes)."""
    if _madvise is None or nbytes < min_bytes:
        return 0
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end <= start:
        return 0
    if _madvise(start, end - start, _MADV_DONTNEED) != 0:
        log.debug("madvise failed with errno %d", ctypes.get_errno())
        return 0
    return end - start


def release_array_memory(array: np.ndarray) -> int:
    """Drop the pages of a contiguous numpy array whose memory belongs to numpy (its own,
    or a same-sized base array's, as ``np.load`` makes); returns the bytes dropped."""
    owner = array
    while not owner.flags.owndata and isinstance(owner.base, np.ndarray):
        owner = owner.base
    if not owner.flags.owndata or not array.flags.c_contiguous or owner.nbytes != array.nbytes:
        return 0
    return _drop_pages(array.ctypes.data, array.nbytes)


def _vector_pages(vector: Any, itemsize: int) -> int:
    n = int(vector.size())
    if n == 0:
        return 0
    view = faiss.rev_swig_ptr(vector.data(), n)
    return _drop_pages(view.ctypes.data, n * itemsize)


def _list_pages(index: faiss.IndexIVF, chunk: int, pause_s: float) -> int:
    """Drop the pages of every inverted list (codes and ids), ``chunk`` lists at a time
    with a real sleep between chunks. A Python loop that only drops the GIL inside
    ``madvise`` would take it straight back each time and make a query thread wait a
    whole switch interval (5 ms); the sleeps hand the GIL over at once.

    Within a chunk, ranges that touch exactly (views into one buffer) are merged so the
    pages across list boundaries go too; ranges with any gap are never merged (the gap
    may hold another allocation's bytes).
    """
    invlists = index.invlists
    dropped = 0
    for first in range(0, index.nlist, chunk):
        ranges = []
        for lst in range(first, min(first + chunk, index.nlist)):
            n = invlists.list_size(lst)
            if n:
                codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * invlists.code_size)
                ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n)
                ranges.append((codes.ctypes.data, codes.ctypes.data + codes.nbytes))
                ranges.append((ids.ctypes.data, ids.ctypes.data + ids.nbytes))
        ranges.sort()
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start == merged[-1][1]:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        dropped += sum(_drop_pages(start, end - start, min_bytes=4 * _PAGE) for start, end in merged)
        if pause_s > 0:
            time.sleep(pause_s)
    return dropped


def drop_index_pages(index: faiss.Index, *, chunk: int = 16, pause_s: float = 0.0005) -> int:
    """Give the pages of an index's big buffers back to the kernel (vectors, lists,
    graph); returns the bytes dropped. The index reads zeros afterwards."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        return (drop_index_pages(index.base_index, chunk=chunk, pause_s=pause_s)
                + drop_index_pages(index.refine_index, chunk=chunk, pause_s=pause_s))
    if isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap)):
        return drop_index_pages(index.index, chunk=chunk, pause_s=pause_s)
    if isinstance(index, faiss.IndexHNSW):
        return _vector_pages(index.hnsw.neighbors, 4) + drop_index_pages(index.storage)
    if isinstance(index, faiss.IndexIVF):
        return _list_pages(index, chunk, pause_s)
    if isinstance(index, faiss.IndexFlatCodes):
        return _vector_pages(index.codes, 1)
    return 0


_DESTROY_MIN_BYTES = 64 << 20  # below this a plain free is cheaper (0.2 ms at 25 MB)


def destroy_index(index: faiss.Index, min_bytes: int = _DESTROY_MIN_BYTES) -> bool:
    """Free ``index`` without stalling queries: drop its pages, then delete the C++
    object inside a GIL-releasing FAISS call. Returns False (and does nothing) when the
    Python proxy does not own the index or its vectors take less than ``min_bytes``
    (a plain ``del`` is cheaper then). The proxy is dangling after a True."""
    if not index.this.own() or index.ntotal * index.d * 4 < min_bytes:
        return False
    drop_index_pages(index)
    shards = faiss.IndexShards(index.d, False, False)  # not threaded; ids as they are
    shards.own_indices = True
    index.this.disown()
    shards.add_shard(index)
    shards.remove_shard(index)  # `delete index` in C++, inside a GIL-releasing wrapper
    return True
