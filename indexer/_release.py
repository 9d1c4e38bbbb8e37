"""Free a retired index's memory without holding the GIL for long.

Dropping the last reference to a large FAISS index runs its C++ destructor with the GIL
held: for 1M x 64-d vectors that is 20-150 ms on a 2-core machine, and every query
thread stalls that long waiting for the GIL (measured in
``benchmarks/bench_index.py``; the swap-pause target is 1 ms). So before a retired
handle is dropped, its big buffers are handed back to the kernel through calls that
release the GIL:

* inverted lists: ``IndexIVF.replace_invlists`` (a FAISS call, GIL released) deletes
  them in C++;
* flat codes, HNSW graphs, numpy id maps: ``madvise(MADV_DONTNEED)`` over the buffer's
  whole pages (a ``ctypes`` call, GIL released).

After that the destructor has (almost) nothing left to unmap. The buffers must not be
read again: only call this on an index no one can reach.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from typing import Any

import faiss
import numpy as np

__all__ = ["release_index_memory", "release_array_memory"]

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


def _drop_pages(address: int, nbytes: int) -> int:
    """``madvise(MADV_DONTNEED)`` the whole pages inside [address, address + nbytes)."""
    if _madvise is None or nbytes < _MIN_BYTES:
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
    """Drop the pages of a numpy array that owns its (contiguous) buffer; returns bytes dropped."""
    if not array.flags.owndata or not array.flags.c_contiguous:
        return 0
    return _drop_pages(array.ctypes.data, array.nbytes)


def _vector_bytes(vector: Any, itemsize: int) -> int:
    n = int(vector.size())
    if n == 0:
        return 0
    view = faiss.rev_swig_ptr(vector.data(), n)
    return _drop_pages(view.ctypes.data, n * itemsize)


def release_index_memory(index: faiss.Index) -> int:
    """Free what a FAISS index holds (see the module docstring); returns bytes released
    through ``madvise`` (inverted lists freed by FAISS are not counted)."""
    index = faiss.downcast_index(index)
    released = 0
    if isinstance(index, faiss.IndexRefine):
        released += release_index_memory(index.base_index)
        released += release_index_memory(index.refine_index)
    elif isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap)):
        released += release_index_memory(index.index)
    elif isinstance(index, faiss.IndexHNSW):
        released += _vector_bytes(index.hnsw.neighbors, 4)
        released += release_index_memory(index.storage)
    elif isinstance(index, faiss.IndexIVF):
        if index.own_invlists:
            empty = faiss.ArrayInvertedLists(index.nlist, index.code_size)
            empty.this.disown()  # the index owns it from now on
            index.replace_invlists(empty, True)  # deletes the old lists in C++, GIL released
    elif isinstance(index, faiss.IndexFlatCodes):
        released += _vector_bytes(index.codes, 1)
    return released
