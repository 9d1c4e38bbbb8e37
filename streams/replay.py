"""Replay MovieLens ratings as a click stream.

Three layouts are recognised from the files in a directory:

``ml-100k``
    ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``), ``u.user``
    (``id|age|gender|occupation|zip``), ``u.item`` (``id|title|release date|video
    date|url|`` 19 genre flags), optionally ``u.genre`` and ``u.info``.
``ml-1m``
    ``ratings.dat`` (``user::item::rating::timestamp``), ``users.dat``
    (``id::gender::age code::occupation code::zip``), ``movies.dat``
    (``id::title (year)::Genre1|Genre2``). Both latin-1 encoded.
``ml-csv``
    The current MovieLens CSV layout (ml-latest, ml-latest-small, ml-25m, ml-32m;
    UTF-8 with a header line): ``ratings.csv`` (``userId,movieId,rating,timestamp``,
    ratings in half stars 0.5..5.0) and ``movies.csv`` (``movieId,title,genres``,
    genres ``|``-separated, titles quoted when they hold a comma). It has no user
    demographics: users carry no feature beyond their id.

Every rating becomes one ``impression`` at position 0 (``label`` 1 when the rating is
at least ``click_threshold``, 4 by default) and each positive one is followed by a
matching ``click``. Events come in timestamp order (a stable sort, so ties keep the
file order), with ``event_time`` the rating timestamp and one ``request_id`` per
(user, timestamp). Files are checked strictly: a damaged file raises
:class:`~streams.errors.ConfigError` naming the file and the line.

``on_bad_line="skip"`` (``--on-bad-line skip`` on the command line) instead drops the
rating lines that fail a check (field count, empty or non-integer field, rating
outside 1..5, user or item id missing from the user or item table), counts them per
reason (:attr:`MovieLens.skipped`), keeps the first few
(:attr:`MovieLens.skipped_examples`) and logs a WARNING; the user and item tables are
still checked strictly. A *digit frequency check* also looks at the whole ratings
file: a large numeric file in which a digit never occurs has lost that character
throughout, so even the lines that parse may carry wrong ids and timestamps; that is
logged as a WARNING too (and added to the error in strict mode).

User features: ``age`` (bucket), ``gender``, ``occupation``, ``zip_prefix`` (first
character of the zip code). Item features: ``genres`` (tuple), ``year_bucket``
(release decade, e.g. ``"1990s"``, or ``"unknown"``).

>>> age_bucket(23), age_bucket(50), year_bucket(1995), year_bucket(None)
('18-24', '50-55', '1990s', 'unknown')
"""

from __future__ import annotations

import csv
import io
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
from types import MappingProxyType
from typing import Iterator, Literal, Mapping, NamedTuple

import numpy as np

from streams.errors import ConfigError
from streams.events import Event, FeatureValue

__all__ = [
    "MovieLens",
    "SkippedLine",
    "OnBadLine",
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
    "ml-csv": ("ratings.csv", "movies.csv"),
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

OnBadLine = Literal["raise", "skip"]
_ON_BAD_LINE = ("raise", "skip")
_EXAMPLES_PER_REASON = 3  # skipped lines kept as examples, per reason
# The digit frequency check runs on files with at least this many rating lines: every
# line holds ~15 digits (ids, rating, 9-10 digit timestamp), so in intact data of this
# size each of the ten digits occurs many times.
_DIGIT_CHECK_MIN_LINES = 1000
_RATING_FIELDS = ("user id", "item id", "rating", "timestamp")
_RATING_KEYS = ("user_id", "item_id", "rating", "timestamp")
_INT = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts e.g. latin-1 superscripts


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


class SkippedLine(NamedTuple):
    """A rating line left out in ``on_bad_line="skip"`` mode."""

    file: Path
    line: int  #: 1-based line number
    text: str  #: the raw line
    reason: str  #: a key of :attr:`MovieLens.skipped`, e.g. ``"empty_rating"``


@dataclass(frozen=True, eq=False)
class MovieLens:
    """Parsed MovieLens tables.

    Attributes
    ----------
    name
        ``"ml-100k"``, ``"ml-1m"`` or ``"ml-csv"``.
    path
        The directory it was read from.
    user_ids, item_ids, ratings, timestamps
        One entry per rating, in file order: arrays of shape (N,), int64 (``ratings``
        float64 in the ``ml-csv`` layout, which has half stars).
    users, items
        Id -> event features (see the module docstring).
    titles
        Item id -> title.
    skipped
        Rating lines left out, per reason (``on_bad_line="skip"``; empty otherwise):
        ``wrong_field_count``, ``empty_<field>``, ``non_integer_<field>`` (field:
        ``user_id``, ``item_id``, ``rating``, ``timestamp``), ``rating_out_of_range``,
        ``unknown_user_id``, ``unknown_item_id``. A line counts once, for its first failure.
    skipped_examples
        The first few skipped lines of each reason, in file order.
    line_numbers
        The 1-based line of each rating in the ratings file (``None``: line ``i + 1``).
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
    skipped: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    skipped_examples: tuple[SkippedLine, ...] = ()
    line_numbers: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_skipped(self) -> int:
        """How many rating lines were skipped."""
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.ratings)


def detect_movielens_format(path: str | os.PathLike) -> str:
    """``"ml-100k"``, ``"ml-1m"`` or ``"ml-csv"`` for a directory holding that layout.

    Raises :class:`ConfigError` saying which files were expected otherwise.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"MovieLens path {str(p)!r} is not a directory; point it at an unzipped MovieLens "
                          f"folder in one of these layouts: {_layouts_text()}")
    for name, files in MOVIELENS_FORMATS.items():
        if (p / files[0]).is_file():
            missing = [f for f in files if not (p / f).is_file()]
            if missing:
                raise ConfigError(f"{p} looks like {name} ({files[0]} is there) but lacks {', '.join(missing)}")
            return name
    raise ConfigError(f"{p} holds no known MovieLens layout; a MovieLens folder holds the files of one of "
                      f"these layouts: {_layouts_text()}")


def _layouts_text() -> str:
    """Each known layout with the files it needs, for error messages."""
    return "; ".join(f"{name} ({', '.join(files)})" for name, files in MOVIELENS_FORMATS.items())


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


class _Ratings(NamedTuple):
    user_ids: np.ndarray
    item_ids: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    line_numbers: np.ndarray
    n_lines: int  # rating lines read (kept + skipped)
    skipped: Mapping[str, int]
    examples: tuple[SkippedLine, ...]


def _check_on_bad_line(on_bad_line: str) -> None:
    if on_bad_line not in _ON_BAD_LINE:
        raise ConfigError(f"on_bad_line must be 'raise' or 'skip', got {on_bad_line!r}")


def _digit_frequency_problem(path: Path, text: str, n_lines: int) -> str | None:
    """Why ``text`` (a numeric ratings file) looks systematically corrupted, or ``None``.

    In intact rating data of :data:`_DIGIT_CHECK_MIN_LINES` lines or more every digit
    occurs many times; a digit that never occurs means a character was lost throughout
    the file, which also silently changes the ids and timestamps of lines that still parse.
    """
    if n_lines < _DIGIT_CHECK_MIN_LINES:
        return None
    missing = [d for d in "0123456789" if d not in text]
    if not missing:
        return None
    which = (f"digit {missing[0]!r} never occurs" if len(missing) == 1
             else f"digits {', '.join(repr(d) for d in missing)} never occur")
    return (f"digit frequency check: {which} in the {n_lines:,} lines of {path}; "
            f"the file looks systematically corrupted (that character was lost throughout), so the ids "
            f"and timestamps of the lines that still parse may be wrong too; replace it with an intact copy")


def _parse_line(line: str, sep: str, users: Mapping[int, object],
                items: Mapping[int, object]) -> tuple[str, str] | tuple[int, int, int, int]:
    """The ``(user, item, rating, timestamp)`` of a rating line, or ``(reason, message)``."""
    row = line.split(sep)
    if len(row) != 4:
        return "wrong_field_count", f"expected 4 rating fields separated by {sep!r}, got {len(row)}"
    for name, key, value in zip(_RATING_FIELDS, _RATING_KEYS, row):
        if not _INT.fullmatch(value.strip()):
            reason = f"empty_{key}" if not value.strip() else f"non_integer_{key}"
            return reason, f"{name} {value!r} is not a non-negative integer (ratings must be whole stars 1..5)"
    u, i, r, t = (int(v) for v in row)
    if not 1 <= r <= 5:
        return "rating_out_of_range", f"rating {r} is outside 1..5"
    if u not in users:
        return "unknown_user_id", f"user {u} is not in the user table"
    if i not in items:
        return "unknown_item_id", f"item {i} is not in the item table"
    return u, i, r, t


_HINTS = {
    "wrong_field_count": "the file is damaged or not MovieLens data",
    "unknown_user_id": "the files do not belong together or are damaged",
    "unknown_item_id": "the files do not belong together or are damaged",
    "rating_out_of_range": "the file is damaged",
}


def _parse_ratings(path: Path, sep: str, users: Mapping[int, object], items: Mapping[int, object],
                   on_bad_line: str) -> _Ratings:
    """Parse and check a ratings file; see :func:`load_movielens` for ``on_bad_line``."""
    try:
        text = path.read_text(encoding=_ENCODING)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    lines = text.splitlines()
    while lines and lines[-1] == "":  # trailing blank lines; lines[i] stays line i + 1
        lines.pop()
    if not lines:
        raise ConfigError(f"{path} holds no ratings")
    corrupted = _digit_frequency_problem(path, text, len(lines))
    kept: list[tuple[int, int, int, int]] = []
    kept_lines: list[int] = []
    skipped: dict[str, int] = {}
    examples: list[SkippedLine] = []
    esc = re.escape(sep)
    plain = re.compile(rf"([0-9]+){esc}([0-9]+){esc}([1-5]){esc}([0-9]+)").fullmatch  # the common, valid line
    for lineno, line in enumerate(lines, 1):
        m = plain(line)
        if m is not None:
            u, i = int(m[1]), int(m[2])
            if u in users and i in items:
                kept.append((u, i, int(m[3]), int(m[4])))
                kept_lines.append(lineno)
                continue
        parsed = _parse_line(line, sep, users, items)  # says what is wrong (or accepts padded fields)
        if isinstance(parsed[0], int):
            kept.append(parsed)  # type: ignore[arg-type]
            kept_lines.append(lineno)
            continue
        reason, message = parsed
        if on_bad_line == "raise":
            hint = _HINTS.get(reason, "the file is damaged, re-download it")
            extra = f"; {corrupted}" if corrupted else ""
            raise ConfigError(f"{path} line {lineno}: {message}; {hint}{extra}. To use only the lines that "
                              "pass, load with on_bad_line='skip' (CLI: --on-bad-line skip)")
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] <= _EXAMPLES_PER_REASON:
            examples.append(SkippedLine(path, lineno, line, reason))
    if corrupted:
        log.warning("%s", corrupted)
    if skipped:
        total = sum(skipped.values())
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
        first = "; ".join(f"line {e.line} {e.text!r} ({e.reason})" for e in examples[:3])
        log.warning("skipped %s of the %s lines of %s (%s usable): %s; e.g. %s", f"{total:,}",
                    f"{len(lines):,}", path, f"{len(kept):,}", reasons, first)
    if not kept:
        raise ConfigError(f"{path} holds no usable rating line ({len(lines):,} lines, all skipped)")
    table = np.array(kept, dtype=np.int64)
    return _Ratings(table[:, 0], table[:, 1], table[:, 2], table[:, 3], np.array(kept_lines, dtype=np.int64),
                    len(lines), MappingProxyType(skipped), tuple(sorted(examples, key=lambda e: e.line)))


def _load_ml100k(p: Path, on_bad_line: str) -> MovieLens:
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
    got = _parse_ratings(path, "\t", users, items, on_bad_line)
    info = p / "u.info"
    if info.is_file():
        declared = re.search(r"(\d+)\s+ratings", info.read_text(encoding=_ENCODING))
        if declared and int(declared.group(1)) != got.n_lines:
            message = (f"{info} declares {declared.group(1)} ratings but {path} holds {got.n_lines} rating "
                       "lines; the file is truncated or damaged, re-download it")
            if on_bad_line == "raise":
                raise ConfigError(message)
            log.warning("%s (using the %s lines that pass)", message, f"{len(got.ratings):,}")
        elif declared and got.skipped:  # the count matches: the skipped lines explain the shortfall
            log.info("%s declares %s ratings and %s holds as many lines; %s were skipped, %s are used",
                     info, declared.group(1), path, f"{sum(got.skipped.values()):,}", f"{len(got.ratings):,}")
    return _movielens("ml-100k", p, got, users, items, titles)


def _movielens(name: str, p: Path, got: _Ratings, users, items, titles) -> MovieLens:
    return MovieLens(name, p, got.user_ids, got.item_ids, got.ratings, got.timestamps, users, items, titles,
                     skipped=got.skipped, skipped_examples=got.examples, line_numbers=got.line_numbers)


def _load_ml1m(p: Path, on_bad_line: str) -> MovieLens:
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
    got = _parse_ratings(p / "ratings.dat", "::", users, items, on_bad_line)
    return _movielens("ml-1m", p, got, users, items, titles)

_DOWNLOADABLE = ("ml-100k", "ml-1m")  # the layouts named after the archive they come in
_HALF_STARS = frozenset(k / 2 for k in range(1, 11))  # 0.5, 1.0, ..., 5.0


def _read_csv(path: Path, header: tuple[str, ...]) -> list[list[str]]:
    """The rows of a UTF-8 CSV file after its header, which must be ``header``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    rows = list(csv.reader(io.StringIO(text)))
    while rows and not rows[-1]:
        rows.pop()
    if not rows or tuple(f.strip() for f in rows[0]) != header:
        got = ",".join(rows[0]) if rows else "nothing"
        raise ConfigError(f"{path}: expected the header line {','.join(header)!r}, got {got!r}; "
                          "this is not a MovieLens CSV file")
    return rows[1:]


def _csv_rating(row: list[str], items: Mapping[int, object]) -> tuple[str, str] | tuple[int, int, float, int]:
    """The ``(user, item, rating, timestamp)`` of a ratings.csv row, or ``(reason, message)``."""
    if len(row) != 4:
        return "wrong_field_count", f"expected 4 comma-separated fields, got {len(row)}"
    for name, key, value in zip(_RATING_FIELDS, _RATING_KEYS, row):
        if key != "rating" and not _INT.fullmatch(value.strip()):
            reason = f"empty_{key}" if not value.strip() else f"non_integer_{key}"
            return reason, f"{name} {value!r} is not a non-negative integer"
    try:
        rating = float(row[2])
    except ValueError:
        return ("empty_rating" if not row[2].strip() else "non_number_rating"), f"rating {row[2]!r} is not a number"
    if rating not in _HALF_STARS:
        return "rating_out_of_range", f"rating {row[2]!r} is not a half star in 0.5..5.0"
    i = int(row[1])
    if i not in items:
        return "unknown_item_id", f"movie {i} is not in movies.csv"
    return int(row[0]), i, rating, int(row[3])


def _load_csv(p: Path, on_bad_line: str) -> MovieLens:
    items: dict[int, dict[str, FeatureValue]] = {}
    titles: dict[int, str] = {}
    for lineno, row in enumerate(_read_csv(p / "movies.csv", ("movieId", "title", "genres")), 2):
        if len(row) != 3 or not _INT.fullmatch(row[0].strip()):
            raise ConfigError(f"{p / 'movies.csv'} line {lineno}: expected movieId,title,genres with an integer "
                              f"movieId, got {row!r}; the file is damaged or not MovieLens data")
        m = _YEAR_IN_TITLE.search(row[1].strip())
        genres = tuple(g for g in row[2].split("|") if g and g != "(no genres listed)")
        items[int(row[0])] = {"genres": genres or ("unknown",),
                              "year_bucket": year_bucket(int(m.group(1)) if m else None)}
        titles[int(row[0])] = row[1]
    path = p / "ratings.csv"
    kept: list[tuple[int, int, float, int]] = []
    kept_lines: list[int] = []
    skipped: dict[str, int] = {}
    examples: list[SkippedLine] = []
    for lineno, row in enumerate(_read_csv(path, ("userId", "movieId", "rating", "timestamp")), 2):
        parsed = _csv_rating(row, items)
        if isinstance(parsed[0], int):
            kept.append(parsed)  # type: ignore[arg-type]
            kept_lines.append(lineno)
            continue
        reason, message = parsed
        if on_bad_line == "raise":
            hint = _HINTS.get(reason, "the file is damaged, re-download it")
            raise ConfigError(f"{path} line {lineno}: {message}; {hint}. To use only the lines that pass, load "
                              "with on_bad_line='skip' (CLI: --on-bad-line skip)")
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] <= _EXAMPLES_PER_REASON:
            examples.append(SkippedLine(path, lineno, ",".join(row), reason))
    if skipped:
        log.warning("skipped %s lines of %s (%s usable): %s", f"{sum(skipped.values()):,}", path,
                    f"{len(kept):,}", ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items())))
    if not kept:
        raise ConfigError(f"{path} holds no usable rating line")
    users = {u: {} for u in sorted({k[0] for k in kept})}
    got = _Ratings(np.array([k[0] for k in kept], dtype=np.int64), np.array([k[1] for k in kept], dtype=np.int64),
                   np.array([k[2] for k in kept], dtype=np.float64), np.array([k[3] for k in kept], dtype=np.int64),
                   np.array(kept_lines, dtype=np.int64), len(kept) + sum(skipped.values()),
                   MappingProxyType(skipped), tuple(examples))
    return _movielens("ml-csv", p, got, users, items, titles)


def load_movielens(path: str | os.PathLike, *, on_bad_line: OnBadLine = "raise") -> MovieLens:
    """Parse the MovieLens data in ``path`` (format detected from its files).

    Parameters
    ----------
    on_bad_line
        ``"raise"`` (default): the first rating line that fails a check raises
        :class:`ConfigError` naming the file and the line, so damaged data is never
        used silently. ``"skip"``: such lines are left out, counted per reason in
        :attr:`MovieLens.skipped` (first few in :attr:`MovieLens.skipped_examples`)
        and reported in a WARNING log; a ``u.info`` rating count that differs from
        the lines in ``u.data`` becomes a WARNING too. Only the ratings file is
        lenient: a damaged user or item table still raises.
    """
    _check_on_bad_line(on_bad_line)
    p = Path(path)
    name = detect_movielens_format(p)
    loaders = {"ml-100k": _load_ml100k, "ml-1m": _load_ml1m, "ml-csv": _load_csv}
    return loaders[name](p, on_bad_line)


def iter_movielens_events(path: str | os.PathLike | MovieLens, *, click_threshold: int = 4,
                          on_bad_line: OnBadLine = "raise", requests: bool = False,
                          request_k: int = 10) -> Iterator[Event]:
    """Yield the ratings in ``path`` as impressions (and clicks), in timestamp order.

    ``path`` may also be an already loaded :class:`MovieLens` (``on_bad_line`` is then
    not used). The files are parsed (and checked, see :func:`load_movielens` for
    ``on_bad_line``) before the first event is yielded. Event ids carry the rating's
    0-based line index in the ratings file (``ml100k-<index>``, clicks ``-c``).
    With ``requests``, a request event (``k=request_k``, event id ``<first rating>-r``)
    comes before the first rating of each (user, timestamp): the user asking, then
    rating what was shown, so a scorer has requests to answer during a replay.
    """
    _check_on_bad_line(on_bad_line)
    ml = path if isinstance(path, MovieLens) else load_movielens(path, on_bad_line=on_bad_line)
    prefix = ml.name.replace("-", "")
    order = np.argsort(ml.timestamps, kind="stable")
    rows = order if ml.line_numbers is None else ml.line_numbers[order] - 1
    users, items = ml.users, ml.items
    return _events(prefix, rows.tolist(), ml.user_ids[order].tolist(), ml.item_ids[order].tolist(),
                   ml.ratings[order].tolist(), ml.timestamps[order].tolist(), users, items, click_threshold,
                   request_k if requests else None)


def _events(prefix, rows, user_ids, item_ids, ratings, timestamps, users, items, threshold,
            request_k: int | None = None) -> Iterator[Event]:
    asked: set[str] = set()
    for row, u, i, r, ts in zip(rows, user_ids, item_ids, ratings, timestamps):
        uid, iid, t = str(u), str(i), float(ts)
        rid = f"{prefix}-{u}-{ts}"
        uf, itf = users[u], items[i]
        if request_k is not None and rid not in asked:
            asked.add(rid)
            yield Event(kind="request", event_id=f"{prefix}-{row}-r", event_time=t, user_id=uid, request_id=rid,
                        user_features=dict(uf), k=request_k)
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
    if name not in _DOWNLOADABLE:
        raise ConfigError(f"unknown MovieLens data set {name!r}; choose one of {', '.join(_DOWNLOADABLE)}")
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
