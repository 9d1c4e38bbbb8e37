"""MovieLens replay: format detection, strict parsing, event order and content."""

from __future__ import annotations

import csv
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streams.errors import ConfigError
from streams.events import decode_event, encode_event
from streams.replay import (
    detect_movielens_format,
    download_movielens,
    iter_movielens_events,
    load_movielens,
)

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


def write_ml100k(folder: Path, ratings: str | None = None) -> Path:
    """A tiny ml-100k folder: 3 users, 3 items, 6 ratings (two ties on a timestamp)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|T8H1N\n",
                                   encoding="latin-1")
    (folder / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags('Animation', 'Comedy')}\n"
        f"2|Café Society (1995)|01-Jan-1971||http://x|{_flags('Drama')}\n"
        f"3|Unknown (????)|||http://x|{_flags()}\n",
        encoding="latin-1")
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)), encoding="latin-1")
    if ratings is None:
        ratings = "1\t1\t5\t300\n2\t2\t3\t100\n1\t3\t4\t200\n3\t1\t1\t200\n2\t1\t4\t100\n1\t2\t2\t300\n"
    (folder / "u.data").write_text(ratings, encoding="latin-1")
    return folder


def write_ml1m(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n", encoding="latin-1")
    (folder / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
        "3::Métropolis (1927)::Sci-Fi\n", encoding="latin-1")
    (folder / "ratings.dat").write_text("1::1::5::978300760\n2::3::3::978300100\n1::2::4::978300100\n",
                                        encoding="latin-1")
    return folder


def test_ml100k_events_in_timestamp_order_with_features(tmp_path):
    events = list(iter_movielens_events(write_ml100k(tmp_path / "ml")))
    impressions = [e for e in events if e.kind == "impression"]
    # Stable sort by timestamp: ties keep the file order (file rows 1, 4 at t=100; 2, 3 at t=200).
    assert [(e.user_id, e.item_id, e.event_time) for e in impressions] == [
        ("2", "2", 100.0), ("2", "1", 100.0), ("1", "3", 200.0), ("3", "1", 200.0), ("1", "1", 300.0),
        ("1", "2", 300.0)]
    assert [e.label for e in impressions] == [0, 1, 1, 0, 1, 0]
    assert all(e.position == 0 for e in impressions)
    # A click right after every positive impression, same request, item and time.
    for j, e in enumerate(events):
        if e.kind == "impression" and e.label == 1:
            click = events[j + 1]
            assert click.kind == "click" and click.label == 1
            assert (click.request_id, click.item_id, click.event_time) == (e.request_id, e.item_id, e.event_time)
            assert click.event_id != e.event_id
    assert Counter(e.kind for e in events) == {"impression": 6, "click": 3}
    assert len({e.event_id for e in events}) == len(events)
    # One request per (user, timestamp).
    assert impressions[0].request_id == impressions[1].request_id
    assert impressions[2].request_id != impressions[3].request_id
    first = impressions[1]
    assert dict(first.user_features) == {"age": "50-55", "gender": "F", "occupation": "other", "zip_prefix": "9"}
    assert dict(first.item_features) == {"genres": ("Animation", "Comedy"), "year_bucket": "1990s"}
    assert dict(impressions[3].user_features)["age"] == "under-18"
    assert dict(impressions[3].user_features)["zip_prefix"] == "T"
    assert dict(impressions[0].item_features) == {"genres": ("Drama",), "year_bucket": "1970s"}
    assert dict(impressions[2].item_features) == {"genres": ("unknown",), "year_bucket": "unknown"}
    for e in events:
        assert decode_event(encode_event(e)) == e


def test_load_movielens_tables(tmp_path):
    ml = load_movielens(write_ml100k(tmp_path / "ml"))
    assert ml.name == "ml-100k" and len(ml) == 6
    np.testing.assert_array_equal(ml.ratings, [5, 3, 4, 1, 4, 2])
    np.testing.assert_array_equal(ml.timestamps, [300, 100, 200, 200, 100, 300])
    assert ml.titles[2] == "Café Society (1995)"
    assert sorted(ml.users) == [1, 2, 3] and sorted(ml.items) == [1, 2, 3]


def test_ml1m_format(tmp_path):
    path = write_ml1m(tmp_path / "ml1m")
    assert detect_movielens_format(path) == "ml-1m"
    events = list(iter_movielens_events(path))
    impressions = [e for e in events if e.kind == "impression"]
    assert [(e.user_id, e.item_id, e.label) for e in impressions] == [("2", "3", 0), ("1", "2", 1), ("1", "1", 1)]
    assert Counter(e.kind for e in events) == {"impression": 3, "click": 2}
    assert dict(impressions[1].user_features) == {
        "age": "under-18", "gender": "F", "occupation": "K-12 student", "zip_prefix": "4"}
    assert dict(impressions[0].user_features)["occupation"] == "self-employed"
    assert dict(impressions[0].user_features)["age"] == "56+"
    assert dict(impressions[0].item_features) == {"genres": ("Sci-Fi",), "year_bucket": "1920s"}
    assert dict(impressions[1].item_features)["genres"] == ("Adventure", "Children's", "Fantasy")


def test_click_threshold(tmp_path):
    events = list(iter_movielens_events(write_ml100k(tmp_path / "ml"), click_threshold=5))
    assert Counter(e.kind for e in events) == {"impression": 6, "click": 1}


def test_unknown_folder_says_which_files_were_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as err:
        load_movielens(tmp_path / "empty")
    for name in ("u.data", "u.user", "u.item", "ratings.dat", "users.dat", "movies.dat"):
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="not a directory"):
        load_movielens(tmp_path / "missing")


def test_missing_companion_file(tmp_path):
    path = write_ml100k(tmp_path / "ml")
    (path / "u.item").unlink()
    with pytest.raises(ConfigError, match="u.item"):
        iter_movielens_events(path)


@pytest.mark.parametrize("ratings, message", [
    ("1\t1\t5\t300\n2\t2\t\t100\n", r"u.data line 2: rating '' "),
    ("1\t1\t5\t300\n2\t2\t3\n", r"u.data line 2: expected 4"),
    ("1\t1\t5\t300\n\n2\t2\t3\t100\n\n", r"u.data line 2: expected 4"),
    ("1\t1\t7\t300\n", r"line 1: rating 7 is outside 1..5"),
    ("1\t1\t3.5\t300\n", r"line 1: rating '3.5'"),
    ("1\t1\t5\t300\n9\t1\t5\t300\n", r"line 2: user 9 is not in the user table"),
    ("1\t1\t5\t300\n1\t99\t5\t300\n", r"line 2: item 99 is not in the item table"),
])
def test_damaged_ratings_are_reported_with_file_and_line(tmp_path, ratings, message):
    path = write_ml100k(tmp_path / "ml", ratings=ratings)
    with pytest.raises(ConfigError, match=message):
        load_movielens(path)


def test_u_info_count_mismatch(tmp_path):
    path = write_ml100k(tmp_path / "ml")
    (path / "u.info").write_text("3 users\n3 items\n7 ratings\n")
    with pytest.raises(ConfigError, match="declares 7 ratings"):
        load_movielens(path)


def _zip_of(folder: Path, name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{name}/{f.name}")
    return buf.getvalue()


def test_download_from_a_mirror_url(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ml-100k.zip").write_bytes(_zip_of(write_ml100k(tmp_path / "src"), "ml-100k"))
    dest = tmp_path / "data"
    got = download_movielens("ml-100k", dest, base_url=mirror.as_uri())
    assert got == dest / "ml-100k"
    assert len(load_movielens(got)) == 6
    assert [p.name for p in dest.iterdir()] == ["ml-100k"], "no temporary files left behind"
    (mirror / "ml-100k.zip").unlink()
    assert download_movielens("ml-100k", dest, base_url=mirror.as_uri()) == got, "present data is reused"


def test_download_failure_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="could not download .*unzip it so that"):
        download_movielens("ml-1m", tmp_path, base_url=(tmp_path / "nowhere").as_uri())
    with pytest.raises(ConfigError, match="unknown MovieLens data set"):
        download_movielens("ml-25m-typo", tmp_path)


def test_download_refuses_entries_outside_the_folder(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t1\t5\t1\n")
        zf.writestr("ml-100k/../../evil.txt", "x")
    (mirror / "ml-100k.zip").write_bytes(buf.getvalue())
    with pytest.raises(ConfigError, match="unexpected entry"):
        download_movielens("ml-100k", tmp_path / "data", base_url=mirror.as_uri())
    assert not (tmp_path / "evil.txt").exists()


# ----------------------------------------------------------------- the real ml-100k


def test_real_ml100k_replay(movielens_path):
    events = list(iter_movielens_events(movielens_path))  # a damaged file fails here, saying where
    with open(movielens_path / "u.data", newline="", encoding="latin-1") as f:
        raw = list(csv.reader(f, delimiter="\t"))
    positives = sum(1 for row in raw if int(row[2]) >= 4)
    kinds = Counter(e.kind for e in events)
    assert kinds["impression"] == len(raw) == 100_000
    assert kinds["click"] == positives
    assert set(kinds) == {"impression", "click"}
    times = [e.event_time for e in events]
    assert all(a <= b for a, b in zip(times, times[1:]))
    assert len({e.event_id for e in events}) == len(events)
    for e in events:
        assert decode_event(encode_event(e)) == e
