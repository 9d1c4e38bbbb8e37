"""MovieLens replay: format detection, strict parsing, skipping bad lines, event order and content.

The shared ml-100k copy (``movielens_path``) is damaged: every ``1`` character was lost
from ``u.data``. The tests on it check that strict loading refuses it and that
``on_bad_line="skip"`` keeps exactly the lines an independent check here accepts.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streams.errors import ConfigError
from streams.events import decode_event, encode_event
from streams import _produce_cli
from streams.replay import (
    SkippedLine,
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
    for name in ("u.data", "u.user", "u.item", "ratings.dat", "users.dat", "movies.dat", "ratings.csv",
                 "movies.csv", "ml-100k", "ml-1m", "ml-csv"):
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


# ------------------------------------------------------------ on_bad_line="skip"


@pytest.mark.parametrize("ratings, reason, lineno", [
    ("1\t1\t5\t300\n2\t2\t\t100\n", "empty_rating", 2),
    ("1\t1\t5\t300\n\t2\t3\t100\n", "empty_user_id", 2),
    ("1\t1\t5\t300\n2\t2\t3\n", "wrong_field_count", 2),
    ("1\t1\t5\t300\n\n2\t2\t3\t100\n\n", "wrong_field_count", 2),
    ("1\t1\t7\t300\n2\t2\t3\t100\n", "rating_out_of_range", 1),
    ("1\t1\t0\t300\n2\t2\t3\t100\n", "rating_out_of_range", 1),
    ("1\t1\t3.5\t300\n2\t2\t3\t100\n", "non_integer_rating", 1),
    ("1\t1\t5\t3e2\n2\t2\t3\t100\n", "non_integer_timestamp", 1),
    ("1\t1\t5\t300\n2\t\u00b2\t3\t100\n", "non_integer_item_id", 2),  # '²'.isdigit() is True
    ("1\t1\t5\t300\n9\t1\t5\t300\n", "unknown_user_id", 2),
    ("1\t1\t5\t300\n0\t1\t5\t300\n", "unknown_user_id", 2),
    ("1\t1\t5\t300\n1\t99\t5\t300\n", "unknown_item_id", 2),
])
def test_skip_mode_leaves_out_the_bad_line_and_says_why(tmp_path, caplog, ratings, reason, lineno):
    path = write_ml100k(tmp_path / "ml", ratings=ratings)
    with pytest.raises(ConfigError, match=rf"u\.data line {lineno}: "):
        load_movielens(path)  # strict by default
    with caplog.at_level(logging.WARNING, logger="streams.replay"):
        ml = load_movielens(path, on_bad_line="skip")
    assert dict(ml.skipped) == {reason: 1}
    raw = ratings.split("\n")[lineno - 1]
    assert ml.skipped_examples == (SkippedLine(path / "u.data", lineno, raw, reason),)
    assert len(ml) == len(ratings.rstrip("\n").split("\n")) - 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 1 " in m and reason in m and "u.data" in m for m in warnings), warnings


def test_skip_mode_counts_every_reason_and_keeps_the_rest(tmp_path):
    good = ["1\t1\t5\t300", "2\t2\t3\t100", "3\t1\t4\t200"]
    bad = {"empty_rating": ["2\t3\t\t150", "3\t2\t\t160", "1\t2\t\t170", "1\t3\t\t180"],
           "unknown_user_id": ["0\t1\t4\t150"], "unknown_item_id": ["1\t0\t4\t150"],
           "wrong_field_count": ["1\t1\t5"]}
    lines = [good[0], *bad["empty_rating"], good[1], bad["unknown_user_id"][0], bad["unknown_item_id"][0],
             bad["wrong_field_count"][0], good[2]]
    path = write_ml100k(tmp_path / "ml", ratings="\n".join(lines) + "\n")
    ml = load_movielens(path, on_bad_line="skip")
    assert dict(ml.skipped) == {k: len(v) for k, v in bad.items()}
    assert ml.n_skipped == 7 and len(ml) == 3
    np.testing.assert_array_equal(ml.user_ids, [1, 2, 3])
    np.testing.assert_array_equal(ml.ratings, [5, 3, 4])
    np.testing.assert_array_equal(ml.line_numbers, [1, 6, 10])
    # A few examples per reason (three), in file order.
    assert [(e.line, e.reason) for e in ml.skipped_examples] == [
        (2, "empty_rating"), (3, "empty_rating"), (4, "empty_rating"), (7, "unknown_user_id"),
        (8, "unknown_item_id"), (9, "wrong_field_count")]
    assert all(e.text == lines[e.line - 1] for e in ml.skipped_examples)
    # Event ids name the line of the ratings file, whatever was skipped before it.
    events = list(iter_movielens_events(path, on_bad_line="skip"))
    assert [e.event_id for e in events if e.kind == "impression"] == ["ml100k-5", "ml100k-9", "ml100k-0"]
    with pytest.raises(ConfigError, match="line 2: rating ''"):
        iter_movielens_events(path)


def test_skip_mode_with_nothing_left_is_an_error(tmp_path):
    path = write_ml100k(tmp_path / "ml", ratings="1\t1\t\t300\n2\t2\t\t100\n")
    with pytest.raises(ConfigError, match="no usable rating line"):
        load_movielens(path, on_bad_line="skip")


def test_on_bad_line_must_be_raise_or_skip(tmp_path):
    path = write_ml100k(tmp_path / "ml")
    with pytest.raises(ConfigError, match="on_bad_line must be 'raise' or 'skip'"):
        load_movielens(path, on_bad_line="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_bad_line"):
        iter_movielens_events(path, on_bad_line="warn")  # type: ignore[arg-type]


def test_intact_file_loads_the_same_in_both_modes(tmp_path, caplog):
    path = write_ml100k(tmp_path / "ml")
    with caplog.at_level(logging.WARNING, logger="streams.replay"):
        strict, lenient = load_movielens(path), load_movielens(path, on_bad_line="skip")
    assert not caplog.records
    assert dict(lenient.skipped) == {} and lenient.skipped_examples == () and dict(strict.skipped) == {}
    for name in ("user_ids", "item_ids", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(strict, name), getattr(lenient, name))
    assert list(iter_movielens_events(strict)) == list(iter_movielens_events(lenient))


def test_u_info_count_mismatch_is_a_warning_in_skip_mode(tmp_path, caplog):
    ratings = "1\t1\t5\t300\n2\t2\t\t100\n1\t3\t4\t200\n"
    path = write_ml100k(tmp_path / "ml", ratings=ratings)
    (path / "u.info").write_text("3 users\n3 items\n3 ratings\n")  # the line count: the skip explains it
    with caplog.at_level(logging.WARNING, logger="streams.replay"):
        ml = load_movielens(path, on_bad_line="skip")
    assert len(ml) == 2 and not any("declares" in r.getMessage() for r in caplog.records)
    (path / "u.info").write_text("3 users\n3 items\n5 ratings\n")  # truncated: two lines are missing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streams.replay"):
        ml = load_movielens(path, on_bad_line="skip")
    assert len(ml) == 2
    assert any("declares 5 ratings" in r.getMessage() and "holds 3 rating lines" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def _synthetic_ratings(n: int = 2000, seed: int = 7) -> str:
    """``n`` plausible ml-100k rating lines over users and items 1..3 (all ten digits occur)."""
    rng = random.Random(seed)
    return "".join(f"{rng.randint(1, 3)}\t{rng.randint(1, 3)}\t{rng.randint(1, 5)}\t"
                   f"{rng.randint(874724710, 893286638)}\n" for _ in range(n))


def _digit_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "digit frequency check" in r.getMessage()]


def test_digit_frequency_check_is_quiet_on_intact_files(tmp_path, caplog):
    big = write_ml100k(tmp_path / "big", ratings=_synthetic_ratings())
    small = write_ml100k(tmp_path / "small")  # digits 6..9 never occur, but 6 lines say nothing
    with caplog.at_level(logging.WARNING, logger="streams.replay"):
        assert len(load_movielens(big, on_bad_line="skip")) == 2000
        assert len(load_movielens(small, on_bad_line="skip")) == 6
        load_movielens(big)
    assert _digit_warnings(caplog) == []


def test_digit_frequency_check_flags_a_digit_lost_throughout(tmp_path, caplog):
    # Drop every '7': ids and ratings here have no 7, so only timestamps change and every
    # line still parses -- exactly the damage no per-line check can see.
    path = write_ml100k(tmp_path / "ml", ratings=_synthetic_ratings().replace("7", ""))
    with caplog.at_level(logging.WARNING, logger="streams.replay"):
        ml = load_movielens(path, on_bad_line="skip")
    assert dict(ml.skipped) == {} and len(ml) == 2000
    (message,) = _digit_warnings(caplog)
    assert "digit '7' never occurs" in message and "u.data" in message and "corrupted" in message


# ----------------------------------------------------------------- the CLI flag


def _parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="towerstream")
    _produce_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_on_bad_line_flag(tmp_path, monkeypatch, capsys):
    path = write_ml100k(tmp_path / "ml", ratings="1\t1\t5\t300\n2\t2\t\t100\n0\t1\t4\t200\n1\t3\t4\t200\n")
    assert _parse_cli(["produce", "replay", "--path", str(path)]).on_bad_line == "raise"
    with pytest.raises(SystemExit):
        _parse_cli(["produce", "replay", "--path", str(path), "--on-bad-line", "ignore"])
    capsys.readouterr()
    sent: list = []
    monkeypatch.setattr(_produce_cli, "_run", lambda args, events: sent.extend(events) or 0)
    with pytest.raises(ConfigError, match=r"u\.data line 2: .*--on-bad-line skip"):
        _produce_cli._replay(_parse_cli(["produce", "replay", "--path", str(path)]))
    assert sent == []
    args = _parse_cli(["produce", "replay", "--path", str(path), "--on-bad-line", "skip"])
    assert args.func(args) == 0
    assert Counter(getattr(e, "kind", "item event") for e in sent) == {"impression": 2, "click": 2, "item event": 2}
    shown = [e.item_id for e in sent if getattr(e, "kind", None) == "impression"]
    assert [e.item_id for e in sent if not hasattr(e, "kind")] == list(dict.fromkeys(shown))  # once, in order
    first = {i: next(n for n, e in enumerate(sent) if getattr(e, "item_id", None) == i) for i in set(shown)}
    assert all(not hasattr(sent[n], "kind") for n in first.values())  # announced before it is shown
    out = capsys.readouterr().out
    assert "skipped 2 bad lines of u.data" in out
    assert "  empty_rating: 1" in out and "  unknown_user_id: 1" in out


# ----------------------------------------------------------------- the real ml-100k


def _independent_check(folder: Path) -> tuple[int, list[tuple[str, str, int, float]], int]:
    """(lines, accepted (user, item, rating, time) rows, first rejected line) of ``u.data``.

    Written from the MovieLens README, not from :mod:`streams.replay`: a line is good
    when it has 4 tab-separated non-empty integer fields, a rating in 1..5 and user and
    item ids that the first column of ``u.user`` / ``u.item`` lists.
    """
    def ids(name: str) -> set[str]:
        with open(folder / name, encoding="latin-1") as f:
            return {line.split("|", 1)[0] for line in f if line.strip()}

    users, items = ids("u.user"), ids("u.item")
    with open(folder / "u.data", encoding="latin-1") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    good, first_bad = [], 0
    for n, line in enumerate(lines, 1):
        fields = line.split("\t")
        ok = (len(fields) == 4 and all(x != "" and all(c in "0123456789" for c in x) for x in fields)
              and 1 <= int(fields[2]) <= 5 and str(int(fields[0])) in users and str(int(fields[1])) in items)
        if ok:
            good.append((str(int(fields[0])), str(int(fields[1])), int(fields[2]), float(fields[3])))
        elif not first_bad:
            first_bad = n
    return len(lines), good, first_bad


def test_real_ml100k_strict_mode_refuses_a_damaged_copy(movielens_path, tmp_path):
    # The damage the shared copy once had (every '1' lost from u.data), made here from the
    # intact files, so the refusal is tested whatever state the shared copy is in.
    damaged = tmp_path / "ml-100k"
    damaged.mkdir()
    for f in movielens_path.iterdir():
        if f.is_file():
            shutil.copy(f, damaged / f.name)
    text = (movielens_path / "u.data").read_text(encoding="latin-1")
    (damaged / "u.data").write_text(text.replace("1", ""), encoding="latin-1")
    _, _, first_bad = _independent_check(damaged)
    assert first_bad, "removing every '1' must break some line"
    with pytest.raises(ConfigError) as err:
        iter_movielens_events(damaged)
    assert f"u.data line {first_bad}: " in str(err.value)
    with pytest.raises(ConfigError, match=rf"u\.data line {first_bad}: "):
        load_movielens(damaged, on_bad_line="raise")


def test_real_ml100k_replay_skip_mode(movielens_path, caplog):
    n_lines, good, first_bad = _independent_check(movielens_path)
    with caplog.at_level(logging.WARNING, logger="streams.replay"):
        ml = load_movielens(movielens_path, on_bad_line="skip")
    assert len(ml) == len(good)
    assert ml.n_skipped == n_lines - len(good)
    events = list(iter_movielens_events(ml))
    impressions = [e for e in events if e.kind == "impression"]
    kinds = Counter(e.kind for e in events)
    assert set(kinds) <= {"impression", "click"}
    assert kinds["impression"] == len(good)
    assert kinds["click"] == sum(1 for _, _, rating, _ in good if rating >= 4)
    # The very rows the independent check accepts, clicks exactly on the ratings >= 4.
    assert Counter((e.user_id, e.item_id, e.label, e.event_time) for e in impressions) == Counter(
        (u, i, int(r >= 4), t) for u, i, r, t in good)
    times = [e.event_time for e in events]
    assert all(a <= b for a, b in zip(times, times[1:]))
    assert len({e.event_id for e in events}) == len(events)
    for e in events:
        assert decode_event(encode_event(e)) == e
    if first_bad:  # the damaged copy: every skipped line is reported and explained
        assert ml.skipped_examples and ml.skipped_examples[0].line == first_bad
        assert any(f"skipped {ml.n_skipped:,} of the {n_lines:,} lines" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)


def test_real_ml100k_digit_frequency_warning(movielens_path, caplog):
    text = (movielens_path / "u.data").read_text(encoding="latin-1")
    missing = [d for d in "0123456789" if d not in text]
    with caplog.at_level(logging.WARNING, logger="streams.replay"):
        load_movielens(movielens_path, on_bad_line="skip")
    warnings = _digit_warnings(caplog)
    if not missing:
        assert warnings == []
        return
    assert missing == ["1"], "the shared copy lost its '1' characters"
    (message,) = warnings
    assert "digit '1' never occurs" in message and "u.data" in message


def write_ml_csv(folder: Path, ratings: str | None = None) -> Path:
    """A tiny folder in the current MovieLens CSV layout (half stars, a quoted title)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children\n"
        '7,"American President, The (1995)",Comedy|Drama|Romance\n9,Untitled,(no genres listed)\n',
        encoding="utf-8")
    if ratings is None:
        ratings = "1,1,4.0,964982703\n1,7,3.5,964981247\n2,1,0.5,964982224\n2,9,5.0,964980000\n3,7,4.5,964990000\n"
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + ratings, encoding="utf-8")
    return folder


def test_csv_layout_is_detected_and_read_with_half_stars(tmp_path):
    path = write_ml_csv(tmp_path / "latest")
    assert detect_movielens_format(path) == "ml-csv"
    ml = load_movielens(path)
    assert ml.name == "ml-csv" and len(ml) == 5
    np.testing.assert_array_equal(ml.ratings, [4.0, 3.5, 0.5, 5.0, 4.5])
    np.testing.assert_array_equal(ml.user_ids, [1, 1, 2, 2, 3])
    assert ml.items[7] == {"genres": ("Comedy", "Drama", "Romance"), "year_bucket": "1990s"}
    assert ml.items[9] == {"genres": ("unknown",), "year_bucket": "unknown"}
    assert ml.titles[7] == "American President, The (1995)"
    assert ml.users[3] == {}  # no demographics in this layout
    impressions = [e for e in iter_movielens_events(ml) if e.kind == "impression"]
    # time order: 2/9 (5.0), 1/7 (3.5), 2/1 (0.5), 1/1 (4.0), 3/7 (4.5); rating >= 4 is a click
    assert [(e.user_id, e.item_id, e.label) for e in impressions] == [
        ("2", "9", 1), ("1", "7", 0), ("2", "1", 0), ("1", "1", 1), ("3", "7", 1)]
    assert decode_event(encode_event(impressions[0])) == impressions[0]


@pytest.mark.parametrize("bad, reason", [("1,1,4.2,964982703", "rating_out_of_range"),
                                         ("1,1,6.0,964982703", "rating_out_of_range"),
                                         ("1,1,x,964982703", "non_number_rating"),
                                         ("1,42,4.0,964982703", "unknown_item_id"),
                                         ("1,1,4.0", "wrong_field_count")])
def test_csv_layout_bad_rating_lines(tmp_path, bad, reason):
    path = write_ml_csv(tmp_path / "latest", ratings=f"1,1,4.0,964982703\n{bad}\n2,7,2.0,964982704\n")
    with pytest.raises(ConfigError, match="ratings.csv line 3"):
        load_movielens(path)
    ml = load_movielens(path, on_bad_line="skip")
    assert len(ml) == 2 and dict(ml.skipped) == {reason: 1}


def test_csv_layout_needs_both_files_and_the_header(tmp_path):
    path = write_ml_csv(tmp_path / "latest")
    (path / "movies.csv").unlink()
    with pytest.raises(ConfigError, match="lacks movies.csv"):
        load_movielens(path)
    path = write_ml_csv(tmp_path / "noheader")
    (path / "ratings.csv").write_text("1,1,4.0,964982703\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="header line"):
        load_movielens(path)
