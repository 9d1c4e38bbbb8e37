"""Versioned artifacts: atomic versions, publish/rollback, retention, and a build killed mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.artifacts import IDS_FILE, INDEX_FILE, ArtifactStore
from indexer.errors import ArtifactError
from indexer.handle import load_handle

REPO = Path(__file__).resolve().parents[2]


def _write(store: ArtifactStore, tag: str, n: int = 8, **manifest: object):
    vecs = np.eye(n, dtype=np.float32)
    index = faiss.IndexFlatIP(n)
    index.add(vecs)
    ids = np.array([f"{tag}-{i}" for i in range(n)])
    return store.write_version(index, ids, {"index": {"kind": "flat", "params": {}}, **manifest})


def test_versions_increase_and_publish_repoints_current(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    assert store.current() is None and store.list_versions() == []
    a, b = _write(store, "a"), _write(store, "b")
    assert (a.version, b.version) == (1, 2)
    assert store.current() is None  # written is not served
    store.publish(1)
    assert store.current() == 1
    store.publish(2)
    assert store.current() == 2
    handle = load_handle(store.current_info().path)
    assert handle.version == 2 and handle.ids[0] == "b-0"
    assert handle.manifest["files"][INDEX_FILE]["bytes"] == (b.path / INDEX_FILE).stat().st_size


def test_rollback_serves_an_older_version_and_refuses_a_missing_one(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    for tag in "abc":
        store.publish(_write(store, tag).version)
    store.rollback(1)
    assert store.current() == 1
    assert load_handle(store.version_dir(1)).ids[0] == "a-0"
    with pytest.raises(ArtifactError, match="does not exist"):
        store.rollback(42)
    assert store.current() == 1
    assert _write(store, "d").version == 4  # numbering goes on after a rollback


def test_retention_keeps_the_newest_and_the_served_version(tmp_path) -> None:
    store = ArtifactStore(tmp_path, keep=2)
    for tag in "abcde":
        _write(store, tag)
    store.publish(1)
    assert store.retain() == [2, 3]
    assert [v.version for v in store.list_versions()] == [1, 4, 5]


def test_a_corrupted_file_is_detected_on_load(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    info = _write(store, "a")
    with (info.path / IDS_FILE).open("r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"Z")
    with pytest.raises(ArtifactError, match="does not match"):
        load_handle(info.path)


def test_id_map_must_match_the_index(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ArtifactError, match="3 ids"):
        store.write_version(index, np.array(["a", "b", "c"]), {})
    assert store.list_versions() == []


_CRASHING_BUILD = """
import sys, time
from pathlib import Path
import numpy as np
from indexer.artifacts import ArtifactStore
from indexer.build import BuildConfig
from indexer.catalogue import Catalogue
from indexer.service import IndexerService
from indexer.testing import FakeCheckpointSource, FakeTwoTower, catalogue_records

root, marker = sys.argv[1], Path(sys.argv[2])

def hook(stage, tmp):
    if stage == "index.faiss":        # the index is on disk, ids and manifest are not
        marker.write_text(str(tmp))
        time.sleep(120)

cat = Catalogue()
for r in catalogue_records(3000):
    cat.observe_record(r)
service = IndexerService(ArtifactStore(root), cat, FakeCheckpointSource(FakeTwoTower()),
                         build_config=BuildConfig(flat_threshold=1000, recall_k=10), build_hook=hook)
service.build_once()
"""


def test_a_build_killed_mid_write_leaves_the_served_version_intact(tmp_path) -> None:
    root = tmp_path / "store"
    store = ArtifactStore(root)
    served = _write(store, "served")
    store.publish(served.version)

    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_BUILD, str(root), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the build process exited before reaching the hook"
            assert time.monotonic() < deadline, "the build never reached the hook"
            time.sleep(0.05)
        half_written = Path(marker.read_text())
        assert (half_written / INDEX_FILE).exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()

    # The served version is untouched, nothing half-written is visible.
    assert store.current() == served.version
    assert [v.version for v in store.list_versions()] == [served.version]
    assert store.latest().version == served.version
    assert load_handle(store.current_info().path).ids[0] == "served-0"
    assert half_written.exists()  # the leftover sits in tmp/ ...

    # ... until the next start cleans it.
    from indexer.catalogue import Catalogue
    from indexer.service import IndexerService
    from indexer.testing import FakeCheckpointSource, FakeTwoTower

    IndexerService(ArtifactStore(root), Catalogue(), FakeCheckpointSource(FakeTwoTower())).start()
    assert not half_written.exists() and list((root / "tmp").iterdir()) == []
    assert _write(store, "next").version == served.version + 1
