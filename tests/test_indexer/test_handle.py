"""Handles and the hot swap: answers are never torn, versions never go backwards."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from indexer.build import BuildConfig, build_index
from indexer.errors import NoIndexError
from indexer.handle import IndexHandle, IndexHolder
from indexer.testing import mixture_of_gaussians

D = 16


def _handle(version: int, n: int) -> IndexHandle:
    """Version ``version``: its own vectors and an id map tagged ``v<version>-`` (disjoint)."""
    vecs = mixture_of_gaussians(n, dim=D, n_clusters=20, seed=version)
    built = build_index(vecs, BuildConfig(flat_threshold=1500, recall_k=10, nlist=16, probe_queries=50))
    ids = np.array([f"v{version}-{i}" for i in range(n)])
    return IndexHandle(built.index, ids, version, {"index": {"kind": built.kind}})


def test_search_maps_labels_through_the_id_map_and_marks_missing() -> None:
    index = faiss.IndexFlatIP(2)
    index.add(np.array([[1, 0], [0, 1]], dtype=np.float32))
    h = IndexHandle(index, np.array(["x", "y"]), 7)
    r = h.search(np.array([[0.2, 0.9]], dtype=np.float32), k=3)
    assert r.version == 7
    assert r.ids.tolist() == [["y", "x", ""]]
    assert r.scores[0, 0] == pytest.approx(0.9) and r.scores[0, 2] == -np.inf


def test_an_empty_holder_says_what_to_do() -> None:
    with pytest.raises(NoIndexError, match="publish"):
        IndexHolder().search(np.zeros((1, D), dtype=np.float32), 5)


def test_hot_swap_under_continuous_queries_is_never_torn_and_monotone() -> None:
    # Flat and IVF handles of different sizes alternate, with disjoint, tagged id maps. The
    # exact answer of every version is known beforehand, so an answer pairing one version's
    # index with another's ids or version number cannot go unnoticed.
    handles = [_handle(v, 1000 + 300 * (v % 3)) for v in range(1, 9)]
    holder = IndexHolder(handles[0])
    queries = mixture_of_gaussians(4, dim=D, n_clusters=20, seed=99)
    expected = {h.version: h.search(queries, k=10).ids for h in handles}
    stop = threading.Event()
    stats = {"queries": 0, "torn": 0, "backwards": 0, "errors": [], "versions": []}

    def query_loop() -> None:
        last = 0
        while not stop.is_set():
            try:
                r = holder.search(queries, k=10)
            except Exception as exc:  # noqa: BLE001 - the test counts any failure
                stats["errors"].append(repr(exc))
                continue
            stats["queries"] += 1
            if not np.array_equal(r.ids, expected[r.version]):
                stats["torn"] += 1
            if r.version < last:
                stats["backwards"] += 1
            if r.version != last:
                stats["versions"].append(r.version)
            last = r.version

    t = threading.Thread(target=query_loop)
    t.start()
    try:
        for h in handles[1:]:
            seen = stats["queries"]
            holder.swap(h)
            while stats["queries"] < seen + 20 and t.is_alive():  # let queries run on each version
                stop.wait(0.001)
    finally:
        stop.set()
        t.join(30)
    assert stats["errors"] == [] and stats["torn"] == 0 and stats["backwards"] == 0
    assert stats["versions"] == list(range(1, 9))  # every version served, in order
    assert holder.swaps == 7 and holder.version == 8
