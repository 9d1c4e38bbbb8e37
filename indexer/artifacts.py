"""Versioned index artifacts on disk: write atomically, publish, list, retain, roll back.

Layout under ``root``::

    root/
      CURRENT                 the served version number (replaced atomically)
      PINNED                  present after `rollback --pin`: builders do not publish
      .lock                   flock'd by every writer (builder, rollback, cleanup)
      tmp/                    versions being written (removed by :meth:`clean_temp`)
      versions/v00000007/     one complete version:
          index.faiss         the FAISS index (row i = label i)
          ids.npy             the id map: item ids, shape (N,), numpy unicode (no pickle)
          trained.faiss       the trained empty IVF index, reused by the next build (IVF only)
          manifest.json       written last; version, source checkpoint + offsets, counts,
                              timings, index params, recall, quality, file sizes + sha256

A version is written into ``tmp/`` and becomes visible only by one ``os.rename`` of its
directory, so a crash mid-write leaves nothing half-written under ``versions/``.
``CURRENT`` is re-pointed by ``os.replace`` of a temp file: publish and rollback are
atomic too. Versions are integers, increasing with every write.

>>> import tempfile, faiss, numpy as np
>>> store = ArtifactStore(tempfile.mkdtemp())
>>> index = faiss.IndexFlatIP(4); index.add(np.eye(4, dtype="float32"))
>>> info = store.write_version(index, np.array(["a", "b", "c", "d"]), {"index": {"kind": "flat"}})
>>> _ = store.publish(info.version); store.current()
1
>>> [v.version for v in store.list_versions()]
[1]
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import faiss
import numpy as np
import orjson

from indexer.errors import ArtifactError

__all__ = [
    "ArtifactStore",
    "VersionInfo",
    "INDEX_FILE",
    "IDS_FILE",
    "TRAINED_FILE",
    "MANIFEST_FILE",
    "version_dirname",
    "verify_file",
]

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
TRAINED_FILE = "trained.faiss"
TOWER_FILE = "tower.ckpt"  # the exact checkpoint the version was built from: its frozen item tower
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
PINNED_FILE = "PINNED"
_PREFIX = "v"


def version_dirname(version: int) -> str:
    """Directory name of a version.

    >>> version_dirname(42)
    'v00000042'
    """
    return f"{_PREFIX}{version:08d}"


def _parse_dirname(name: str) -> int | None:
    if name.startswith(_PREFIX) and name[1:].isdigit():
        return int(name[1:])
    return None


@dataclass(frozen=True)
class VersionInfo:
    """One complete version on disk: its number, directory and manifest."""

    version: int
    path: Path
    manifest: Mapping[str, Any]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as recorded in the manifest."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def verify_file(path: Path, expected: Mapping[str, Any]) -> None:
    """Raise :class:`ArtifactError` unless ``path`` exists with the manifest's size and sha256."""
    try:
        actual = file_digest(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    if actual != expected:
        raise ArtifactError(f"{path} does not match its manifest (size/sha256); re-publish it")


class ArtifactStore:
    """The versions under ``root``.

    Parameters
    ----------
    root
        Store directory (created if missing).
    keep
        :meth:`retain` keeps this many newest versions (and always the served one).
    """

    def __init__(self, root: str | Path, keep: int = 5) -> None:
        if keep < 1:
            raise ArtifactError(f"keep must be >= 1 (versions to retain), got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.versions_dir = self.root / "versions"
        self.tmp_dir = self.root / "tmp"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore(root={str(self.root)!r}, keep={self.keep})"

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock across processes (released by the kernel if the holder dies)."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def clean_temp(self) -> int:
        """Remove leftovers of builds that died mid-write; returns how many were removed."""
        removed = 0
        with self.lock():
            for entry in self.tmp_dir.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("removed %d leftover temp entr%s under %s", removed, "y" if removed == 1 else "ies",
                        self.tmp_dir)
        return removed

    # ------------------------------------------------------------------ reading
    def version_dir(self, version: int) -> Path:
        """Directory of ``version`` (whether or not it exists)."""
        return self.versions_dir / version_dirname(version)

    def _version_numbers(self) -> list[int]:
        numbers = (_parse_dirname(p.name) for p in self.versions_dir.iterdir())
        return sorted(n for n in numbers if n is not None)

    def get(self, version: int) -> VersionInfo:
        """The complete version ``version``; raises :class:`ArtifactError` if absent or broken."""
        path = self.version_dir(version)
        manifest_path = path / MANIFEST_FILE
        try:
            manifest = orjson.loads(manifest_path.read_bytes())
        except FileNotFoundError:
            raise ArtifactError(
                f"version {version} does not exist under {self.versions_dir}; `towerstream index list` shows them"
            ) from None
        except orjson.JSONDecodeError as exc:
            raise ArtifactError(f"{manifest_path} is not valid JSON ({exc})") from None
        if manifest.get("version") != version:
            raise ArtifactError(f"{manifest_path} names version {manifest.get('version')}, not {version}")
        return VersionInfo(version=version, path=path, manifest=manifest)

    def list_versions(self) -> list[VersionInfo]:
        """Every complete version, oldest first (broken ones are logged and skipped)."""
        out = []
        for n in self._version_numbers():
            try:
                out.append(self.get(n))
            except ArtifactError as exc:
                log.warning("skipping version %d: %s", n, exc)
        return out

    def latest(self) -> VersionInfo | None:
        """The newest complete version, served or not."""
        versions = self.list_versions()
        return versions[-1] if versions else None

    def current(self) -> int | None:
        """The served version number, or None if nothing was published."""
        try:
            text = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise ArtifactError(f"{self.root / CURRENT_FILE} holds {text!r}, not a version number")
        return int(text)

    def current_info(self) -> VersionInfo | None:
        """The served version, or None."""
        v = self.current()
        return None if v is None else self.get(v)

    # ------------------------------------------------------------------ writing
    def write_version(
        self,
        index: faiss.Index,
        ids: np.ndarray,
        manifest: Mapping[str, Any],
        *,
        trained: bytes | None = None,
        tower: bytes | None = None,
        hook: Callable[[str, Path], None] | None = None,
    ) -> VersionInfo:
        """Write a new version (not yet served) and return it.

        ``manifest`` is completed with ``version``, ``created_at``, ``item_count`` and
        ``files``. ``tower`` is the checkpoint file the version was built from (its frozen
        item tower, which scorers use to embed item deltas on this version). ``hook(stage,
        tmp_path)`` is called after each file (tests use it to crash mid-write).
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind != "U":
            raise ArtifactError(f"ids must be a 1-d numpy unicode array, got {ids.dtype} with shape {ids.shape}")
        if len(ids) != index.ntotal:
            raise ArtifactError(f"the id map has {len(ids)} ids but the index holds {index.ntotal} vectors")
        with self.lock():
            numbers = self._version_numbers()
            version = (numbers[-1] + 1) if numbers else 1
            tmp = Path(tempfile.mkdtemp(prefix=f".{version_dirname(version)}-", dir=self.tmp_dir))
            try:
                files: dict[str, Any] = {}
                faiss.write_index(index, str(tmp / INDEX_FILE))
                files[INDEX_FILE] = file_digest(tmp / INDEX_FILE)
                if hook:
                    hook(INDEX_FILE, tmp)
                with (tmp / IDS_FILE).open("wb") as fh:
                    np.save(fh, ids, allow_pickle=False)
                files[IDS_FILE] = file_digest(tmp / IDS_FILE)
                if hook:
                    hook(IDS_FILE, tmp)
                if trained is not None:
                    (tmp / TRAINED_FILE).write_bytes(trained)
                    files[TRAINED_FILE] = file_digest(tmp / TRAINED_FILE)
                if tower is not None:
                    (tmp / TOWER_FILE).write_bytes(tower)
                    files[TOWER_FILE] = file_digest(tmp / TOWER_FILE)
                full = dict(manifest)
                full.update(version=version, created_at=time.time(), item_count=int(len(ids)), files=files)
                data = orjson.dumps(full, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY, default=str)
                (tmp / MANIFEST_FILE).write_bytes(data)
                full = orjson.loads(data)  # what readers will see: JSON types only
                for name in files:
                    _fsync_file(tmp / name)
                _fsync_file(tmp / MANIFEST_FILE)
                _fsync_dir(tmp)
                if hook:
                    hook(MANIFEST_FILE, tmp)
                final = self.version_dir(version)
                os.rename(tmp, final)
                _fsync_dir(self.versions_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("wrote index version %d (%d items) to %s", version, len(ids), final)
        return VersionInfo(version=version, path=final, manifest=full)

    def _point_current(self, version: int) -> None:
        tmp = self.root / f".{CURRENT_FILE}.{os.getpid()}.tmp"
        with tmp.open("w") as fh:
            fh.write(f"{version}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / CURRENT_FILE)
        _fsync_dir(self.root)

    def publish(self, version: int) -> VersionInfo:
        """Make ``version`` the served one (atomic re-point of ``CURRENT``)."""
        with self.lock():
            info = self.get(version)
            self._point_current(version)
        log.info("published index version %d", version)
        return info

    def rollback(self, version: int, *, pin: bool = False) -> VersionInfo:
        """Serve an earlier (or any complete) version again; same as :meth:`publish`.

        With ``pin``, builders stop publishing until :meth:`unpin` (otherwise the next
        accepted build replaces the rolled-back version).
        """
        info = self.publish(version)
        if pin:
            self.pin(version)
        log.warning("rolled back: index version %d is served%s", version, " (pinned)" if pin else "")
        return info

    def pin(self, version: int) -> None:
        """Hold publishing: builders skip their builds while ``PINNED`` exists."""
        tmp = self.root / f".{PINNED_FILE}.{os.getpid()}.tmp"
        tmp.write_text(f"{version}\n")
        os.replace(tmp, self.root / PINNED_FILE)

    def unpin(self) -> bool:
        """Let builders publish again; returns whether a pin was removed."""
        try:
            (self.root / PINNED_FILE).unlink()
        except FileNotFoundError:
            return False
        return True

    def pinned(self) -> int | None:
        """The version an operator pinned, or None."""
        try:
            text = (self.root / PINNED_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else -1

    def retain(self) -> list[int]:
        """Delete all but the ``keep`` newest versions, never the served one.

        A version is first renamed into ``tmp/`` and then removed, so it disappears from
        :meth:`list_versions` at once. Returns the deleted version numbers.
        """
        removed = []
        with self.lock():
            current = self.current()
            numbers = self._version_numbers()
            keep = set(numbers[-self.keep:]) | ({current} if current is not None else set())
            for n in numbers:
                if n in keep:
                    continue
                doomed = self.tmp_dir / f".deleting-{version_dirname(n)}"
                os.rename(self.version_dir(n), doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(n)
        if removed:
            log.info("retention removed index versions %s", removed)
        return removed
