"""Handles and the hot swap: answers are never torn, versions never go backwards."""

from __future__ import annotations

import os
import sys
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
    # exact answer of every version is recorded when it is built, so an answer pairing one
    # version's index with another's ids or version number cannot go unnoticed, nor can an
    # answer from a handle whose memory was reaped while the query ran (empty lists).
    # Handles are referenced by the holder only, so reap() really frees them.
    queries = mixture_of_gaussians(4, dim=D, n_clusters=20, seed=99)
    expected: dict[int, np.ndarray] = {}

    def make(v: int) -> IndexHandle:
        h = _handle(v, 1000 + 300 * (v % 3))
        expected[v] = h.search(queries, k=10).ids.copy()
        return h

    holder = IndexHolder(make(1))
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
    reaped = 0
    try:
        for v in range(2, 9):
            holder.swap(make(v), reap=False)
            seen = stats["queries"]
            # Let queries run on each version; reap the retired ones meanwhile.
            while (stats["versions"][-1:] != [v] or stats["queries"] < seen + 20) and t.is_alive():
                reaped += holder.reap()
                stop.wait(0.001)
    finally:
        stop.set()
        t.join(30)
    reaped += holder.reap()
    assert stats["errors"] == [] and stats["torn"] == 0 and stats["backwards"] == 0
    assert stats["versions"] == list(range(1, 9))  # every version served, in order
    assert holder.swaps == 7 and holder.version == 8
    assert reaped == 7 and holder.retired == 0


def test_reap_spares_a_handle_a_query_still_holds() -> None:
    holder = IndexHolder(_handle(1, 2000))
    queries = mixture_of_gaussians(3, dim=D, n_clusters=20, seed=5)
    in_flight = holder.current  # what IndexHolder.search holds while FAISS runs
    before = in_flight.search(queries, k=5).ids
    holder.swap(_handle(2, 2000))
    assert holder.reap() == 0 and holder.retired == 1
    assert np.array_equal(in_flight.search(queries, k=5).ids, before)  # memory intact
    del in_flight
    assert holder.reap() == 1 and holder.retired == 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("config", [
    BuildConfig(kind="flat"),
    BuildConfig(kind="ivf_flat", nlist=32),
    BuildConfig(kind="ivf_pq", nlist=32, pq_m=8, pq_nbits=6),
    BuildConfig(kind="hnsw", hnsw_m=8),
], ids=lambda c: c.kind)
def test_destroyed_indexes_are_freed_and_their_proxies_drop_cleanly(config, tmp_path) -> None:
    from indexer._release import destroy_index

    vecs = mixture_of_gaussians(3000, dim=32, n_clusters=20, seed=1)
    built = build_index(vecs, BuildConfig(**{**config.__dict__, "recall_k": 5, "probe_queries": 20}))
    faiss.write_index(built.index, str(tmp_path / "i.faiss"))
    del built
    index = faiss.read_index(str(tmp_path / "i.faiss"))  # as a scorer holds it
    assert not destroy_index(index)  # small: left to a plain free
    assert destroy_index(index, min_bytes=0)
    assert not destroy_index(index, min_bytes=0)  # no longer owned: a second call does nothing
    del index  # the proxy owns nothing now; dropping it must not double-free


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reap_gives_the_memory_back() -> None:
    n = 300_000  # 77 MB of vectors in one flat index (above the 64 MB destroy threshold)
    vecs = np.random.default_rng(0).normal(size=(n, 64)).astype(np.float32)
    index = faiss.IndexFlatIP(64)
    index.add(vecs)
    del vecs
    holder = IndexHolder(IndexHandle(index, np.array([f"i{i}" for i in range(n)]), 1))
    del index
    holder.swap(_handle(2, 1000), reap=False)
    before = _rss_bytes()
    assert holder.reap() == 1
    assert before - _rss_bytes() > 40 * 2**20
