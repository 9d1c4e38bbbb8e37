"""Free a retired index without holding the GIL.

Dropping the last reference to a large FAISS index runs its C++ destructor from
Python's deallocator, with the GIL held: for 1M x 64-d vectors that is 30-110 ms on 2
cores, during which every query thread stalls (measured: a spinning Python thread makes
~8 % of its normal progress during such a ``del``; the swap-pause target is 1 ms). So
the reaper frees retired handles differently:

* a FAISS index is handed to a throw-away ``IndexShards`` that owns it, and
  ``remove_shard`` deletes it in C++; FAISS's SWIG wrappers release the GIL around that
  call (the spinning thread keeps ~50-70 % of its progress, the rest being CPU
  contention on 2 cores);
* a numpy id map's pages go back to the kernel with ``madvise(MADV_DONTNEED)`` (a
  ``ctypes`` call, which releases the GIL); freeing the emptied buffer is then cheap.

Only call these on objects no one can reach any more: the index proxy is left
dangling, the array's contents are gone.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from typing import Any

import faiss
import numpy as np

__all__ = ["destroy_index", "release_array_memory"]

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


def destroy_index(index: faiss.Index) -> bool:
    """Delete ``index``'s C++ object with the GIL released; returns False (and does
    nothing) when the Python proxy does not own it. The proxy is dangling afterwards."""
    if not index.this.own():
        return False
    shards = faiss.IndexShards(index.d, False, False)  # not threaded; ids as they are
    shards.own_indices = True
    index.this.disown()
    shards.add_shard(index)
    shards.remove_shard(index)  # `delete index` in C++, inside a GIL-releasing wrapper
    return True
