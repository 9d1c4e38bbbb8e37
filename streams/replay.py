"""Replay MovieLens ratings as a click stream.

Two layouts are recognised from the files in a directory (both latin-1 encoded):

``ml-100k``
    ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``), ``u.user``
    (``id|age|gender|occupation|zip``), ``u.item`` (``id|title|release date|video
    date|url|`` 19 genre flags), optionally ``u.genre`` and ``u.info``.
``ml-1m``
    ``ratings.dat`` (``user::item::rating::timestamp``), ``users.dat``
    (``id::gender::age code::occupation code::zip``), ``movies.dat``
    (``id::title (year)::Genre1|Genre2``).

Every rating becomes one ``impression`` at position 0 (``label`` 1 when the rating is
at least ``click_threshold``, 4 by default) and each positive one is followed by a
matching ``click``. Events come in timestamp order (a stable sort, so ties keep the
file order), with ``event_time`` the rating timestamp and one ``request_id`` per
(user, timestamp). Files are checked strictly: a damaged file raises
:class:`~streams.errors.ConfigError` naming the file and the line.

User features: ``age`` (bucket), ``gender``, ``occupation``, ``zip_prefix`` (first
character of the zip code). Item features: ``genres`` (tuple), ``year_bucket``
(release decade, e.g. ``"1990s"``, or ``"unknown"``).

>>> age_bucket(23), age_bucket(50), year_bucket(1995), year_bucket(None)
('18-24', '50-55', '1990s', 'unknown')
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from streams.errors import ConfigError
from streams.events import Event, FeatureValue

__all__ = [
    "MovieLens",
    "MOVIELENS_FORMATS",
    "GROUPLENS_URL",
    "load_movielens",
    "iter_movielens_events",
    "download_movielens",
    "detect_movielens_format",
    "age_bucket",
    "year_bucket",
]

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"
# Format name -> files that must be present.
MOVIELENS_FORMATS: dict[str, tuple[str, ...]] = {
    "ml-100k": ("u.data", "u.user", "u.item"),
    "ml-1m": ("ratings.dat", "users.dat", "movies.dat"),
}
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
_ML1M_AGES = {1: "under-18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
_ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
)
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
_ENCODING = "latin-1"


def age_bucket(age: int) -> str:
    """The MovieLens-1M age bucket of an age in years."""
    for upper, label in ((18, "under-18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
                         (56, "50-55")):
        if age < upper:
            return label
    return "56+"


def year_bucket(year: int | None) -> str:
    """The release decade of a year (``"unknown"`` when there is none)."""
    return "unknown" if year is None else f"{year // 10 * 10}s"


def _zip_prefix(zip_code: str) -> str:
    z = zip_code.strip().upper()
    return z[:1] if z else "unknown"


@dataclass(frozen=True, eq=False)
class MovieLens:
    """Parsed MovieLens tables.

    Attributes
    ----------
    name
        ``"ml-100k"`` or ``"ml-1m"``.
    path
        The directory it was read from.
    user_ids, item_ids, ratings, timestamps
        One entry per rating, in file order: int64 arrays of shape (N,).
    users, items
        Id -> event features (see the module docstring).
    titles
        Item id -> title.
    """

    name: str
    path: Path
    user_ids: np.ndarray
    item_ids: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    users: Mapping[int, dict[str, FeatureValue]] = field(repr=False)
    items: Mapping[int, dict[str, FeatureValue]] = field(repr=False)
    titles: Mapping[int, str] = field(repr=False)

    def __len__(self) -> int:
        return len(self.ratings)


def detect_movielens_format(path: str | os.PathLike) -> str:
    """``"ml-100k"`` or ``"ml-1m"`` for a directory holding that layout.

    Raises :class:`ConfigError` saying which files were expected otherwise.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"MovieLens path {str(p)!r} is not a directory; point it at the unzipped "
                          "ml-100k or ml-1m folder")
    for name, files in MOVIELENS_FORMATS.items():
        if (p / files[0]).is_file():
            missing = [f for f in files if not (p / f).is_file()]
            if missing:
                raise ConfigError(f"{p} looks like {name} ({files[0]} is there) but lacks {', '.join(missing)}")
            return name
    expected = "; ".join(f"{name}: {', '.join(files)}" for name, files in MOVIELENS_FORMATS.items())
    raise ConfigError(f"{p} holds no known MovieLens format; expected the files of one of {expected}")


def _read_rows(path: Path, sep: str, ncols: int | None, what: str) -> list[list[str]]:
    """Split a text file into rows of fields (trailing blank lines dropped)."""
    try:
        text = path.read_text(encoding=_ENCODING)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    rows = [line.split(sep) for line in text.splitlines()]
    while rows and rows[-1] == [""]:  # trailing blank lines; rows[i] stays line i + 1
        rows.pop()
    if ncols is not None:
        for lineno, row in enumerate(rows, 1):
            if len(row) != ncols:
                raise ConfigError(f"{path} line {lineno}: expected {ncols} {what} fields separated by {sep!r}, "
                                  f"got {len(row)}; the file is damaged or not MovieLens data")
    return rows


def _parse_ratings(path: Path, sep: str) -> tuple[np.ndarray, ...]:
    rows = _read_rows(path, sep, 4, "rating")
    if not rows:
        raise ConfigError(f"{path} holds no ratings")
    try:
        table = np.array(rows).astype(np.int64)
    except ValueError:
        names = ("user id", "item id", "rating", "timestamp")
        for lineno, row in enumerate(rows, 1):
            for name, value in zip(names, row):
                if not value.strip().isdigit():
                    raise ConfigError(
                        f"{path} line {lineno}: {name} {value!r} is not a non-negative integer "
                        f"(ratings must be whole stars 1..5); the file is damaged, re-download it"
                    ) from None
        raise
    ratings = table[:, 2]
    bad = np.flatnonzero((ratings < 1) | (ratings > 5))
    if bad.size:
        raise ConfigError(f"{path} line {bad[0] + 1}: rating {ratings[bad[0]]} is outside 1..5")
    return table[:, 0], table[:, 1], ratings, table[:, 3]


def _check_known(path: Path, ids: np.ndarray, known: Mapping[int, object], what: str) -> None:
    ok = np.isin(ids, np.fromiter(known.keys(), dtype=np.int64, count=len(known)))
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        raise ConfigError(f"{path} line {first + 1}: {what} {ids[first]} is not in the {what} table; "
                          "the files do not belong together or are damaged")


def _load_ml100k(p: Path) -> MovieLens:
    users: dict[int, dict[str, FeatureValue]] = {}
    for lineno, row in enumerate(_read_rows(p / "u.user", "|", 5, "user"), 1):
        if not (row[0].isdigit() and row[1].isdigit()):
            raise ConfigError(f"{p / 'u.user'} line {lineno}: id and age must be integers, got {row[:2]}")
        users[int(row[0])] = {"age": age_bucket(int(row[1])), "gender": row[2], "occupation": row[3],
                              "zip_prefix": _zip_prefix(row[4])}
    genres = _ML100K_GENRES
    if (p / "u.genre").is_file():
        named = [row[0] for row in _read_rows(p / "u.genre", "|", 2, "genre")]
        if len(named) == len(_ML100K_GENRES):
            genres = tuple(named)
    items: dict[int, dict[str, FeatureValue]] = {}
    titles: dict[int, str] = {}
    ncols = 5 + len(genres)
    for lineno, row in enumerate(_read_rows(p / "u.item", "|", ncols, "item"), 1):
        if not row[0].isdigit():
            raise ConfigError(f"{p / 'u.item'} line {lineno}: item id {row[0]!r} is not an integer")
        date = row[2].strip()
        year = int(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else None
        flags = row[5:]
        items[int(row[0])] = {"genres": tuple(g for g, f in zip(genres, flags) if f.strip() == "1") or ("unknown",),
                              "year_bucket": year_bucket(year)}
        titles[int(row[0])] = row[1]
    path = p / "u.data"
    user_ids, item_ids, ratings, timestamps = _parse_ratings(path, "\t")
    _check_known(path, user_ids, users, "user")
    _check_known(path, item_ids, items, "item")
    info = p / "u.info"
    if info.is_file():
        declared = re.search(r"(\d+)\s+ratings", info.read_text(encoding=_ENCODING))
        if declared and int(declared.group(1)) != len(ratings):
            raise ConfigError(f"{info} declares {declared.group(1)} ratings but {path} holds {len(ratings)}; "
                              "the file is truncated or damaged, re-download it")
    return MovieLens("ml-100k", p, user_ids, item_ids, ratings, timestamps, users, items, titles)


def _load_ml1m(p: Path) -> MovieLens:
    users: dict[int, dict[str, FeatureValue]] = {}
    for lineno, row in enumerate(_read_rows(p / "users.dat", "::", 5, "user"), 1):
        if not all(v.isdigit() for v in (row[0], row[2], row[3])):
            raise ConfigError(f"{p / 'users.dat'} line {lineno}: id, age and occupation must be integers")
        age, occ = int(row[2]), int(row[3])
        users[int(row[0])] = {
            "age": _ML1M_AGES.get(age, age_bucket(age)),
            "gender": row[1],
            "occupation": _ML1M_OCCUPATIONS[occ] if 0 <= occ < len(_ML1M_OCCUPATIONS) else "other",
            "zip_prefix": _zip_prefix(row[4]),
        }
    items: dict[int, dict[str, FeatureValue]] = {}
    titles: dict[int, str] = {}
    for lineno, row in enumerate(_read_rows(p / "movies.dat", "::", 3, "movie"), 1):
        if not row[0].isdigit():
            raise ConfigError(f"{p / 'movies.dat'} line {lineno}: movie id {row[0]!r} is not an integer")
        m = _YEAR_IN_TITLE.search(row[1])
        genres = tuple(g for g in row[2].split("|") if g and g != "(no genres listed)")
        items[int(row[0])] = {"genres": genres or ("unknown",),
                              "year_bucket": year_bucket(int(m.group(1)) if m else None)}
        titles[int(row[0])] = row[1]
    path = p / "ratings.dat"
    user_ids, item_ids, ratings, timestamps = _parse_ratings(path, "::")
    _check_known(path, user_ids, users, "user")
    _check_known(path, item_ids, items, "item")
    return MovieLens("ml-1m", p, user_ids, item_ids, ratings, timestamps, users, items, titles)


def load_movielens(path: str | os.PathLike) -> MovieLens:
    """Parse the MovieLens data in ``path`` (format detected from its files)."""
    p = Path(path)
    name = detect_movielens_format(p)
    return _load_ml100k(p) if name == "ml-100k" else _load_ml1m(p)


def iter_movielens_events(path: str | os.PathLike | MovieLens, *, click_threshold: int = 4) -> Iterator[Event]:
    """Yield the ratings in ``path`` as impressions (and clicks), in timestamp order.

    ``path`` may also be an already loaded :class:`MovieLens`. The files are parsed
    (and checked) before the first event is yielded.
    """
    ml = path if isinstance(path, MovieLens) else load_movielens(path)
    prefix = ml.name.replace("-", "")
    order = np.argsort(ml.timestamps, kind="stable")
    users, items = ml.users, ml.items
    return _events(prefix, order.tolist(), ml.user_ids[order].tolist(), ml.item_ids[order].tolist(),
                   ml.ratings[order].tolist(), ml.timestamps[order].tolist(), users, items, click_threshold)


def _events(prefix, rows, user_ids, item_ids, ratings, timestamps, users, items, threshold) -> Iterator[Event]:
    for row, u, i, r, ts in zip(rows, user_ids, item_ids, ratings, timestamps):
        uid, iid, t = str(u), str(i), float(ts)
        rid = f"{prefix}-{u}-{ts}"
        uf, itf = users[u], items[i]
        label = int(r >= threshold)
        yield Event(kind="impression", event_id=f"{prefix}-{row}", event_time=t, user_id=uid, request_id=rid,
                    user_features=dict(uf), item_id=iid, item_features=dict(itf), label=label, position=0)
        if label:
            yield Event(kind="click", event_id=f"{prefix}-{row}-c", event_time=t, user_id=uid, request_id=rid,
                        user_features=dict(uf), item_id=iid, item_features=dict(itf), label=1, position=0)


def download_movielens(name: str, dest: str | os.PathLike, *, base_url: str = GROUPLENS_URL,
                       timeout: float = 60.0) -> Path:
    """Download and unzip ``name`` (``"ml-100k"`` or ``"ml-1m"``) into ``dest``; returns ``dest/name``.

    Nothing is downloaded when ``dest/name`` already holds the data. Needs internet
    access to files.grouplens.org; raises :class:`ConfigError` with what to do when it
    fails. Mind the data set's terms of use (its README): research use, no redistribution.
    """
    if name not in MOVIELENS_FORMATS:
        raise ConfigError(f"unknown MovieLens data set {name!r}; choose one of {', '.join(MOVIELENS_FORMATS)}")
    dest_dir = Path(dest)
    target = dest_dir / name
    if target.is_dir():
        try:
            if detect_movielens_format(target) == name:
                return target
        except ConfigError:
            pass
    url = f"{base_url.rstrip('/')}/{name}.zip"
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=f".{name}-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        log.info("downloading %s to %s", url, target)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, archive.open("wb") as out:
                shutil.copyfileobj(resp, out)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(
                f"could not download {url}: {reason}. Without internet access, fetch {name}.zip elsewhere "
                f"and unzip it so that {target} holds {', '.join(MOVIELENS_FORMATS[name])}"
            ) from None
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    parts = Path(member).parts
                    if not parts or parts[0] != name or ".." in parts or Path(member).is_absolute():
                        raise ConfigError(f"{url} holds an unexpected entry {member!r}; not extracting it")
                zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise ConfigError(f"{url} is not a valid zip archive: {exc}") from None
        detect_movielens_format(Path(tmp) / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / name, target)
    return target
