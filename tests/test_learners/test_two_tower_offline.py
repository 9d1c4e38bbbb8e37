"""The offline protocol and ``towerstream train`` on a tiny MovieLens-format directory."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from app import _train_cli
from learners.two_tower.offline import (Progress, movielens_examples, split_examples, train_and_evaluate,
                                        with_leaky_mean_ratings)
from learners.registry import make_learner
from streams.errors import ConfigError

torch.set_num_threads(1)

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _write_ml100k(root, n_ratings: int = 300, bad_rows: tuple[str, ...] = ()) -> None:
    """A small ml-100k layout: users who like even items rate them 5, odd ones 2."""
    rng = random.Random(0)
    (root / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)))
    (root / "u.user").write_text("".join(f"{u}|{20 + u}|{'MF'[u % 2]}|writer|{10000 + u}\n" for u in range(1, 13)))
    items = []
    for i in range(1, 21):
        flags = ["0"] * len(GENRES)
        flags[1 + i % 5] = "1"
        items.append(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n")
    (root / "u.item").write_text("".join(items))
    lines = []
    for k in range(n_ratings):
        u, i = rng.randint(1, 12), rng.randint(1, 20)
        rating = 5 if i % 2 == 0 else 2
        lines.append(f"{u}\t{i}\t{rating}\t{880000000 + k}\n")
    lines[3:3] = [row + "\n" for row in bad_rows]
    (root / "u.data").write_text("".join(lines))


def test_movielens_examples_and_both_splits(tmp_path):
    _write_ml100k(tmp_path)
    data = movielens_examples(tmp_path)
    assert len(data.xs) == 300 and set(np.unique(data.ys)) == {0.0, 1.0}
    x = data.xs[0]
    assert x["user_id"].isdigit() and "i:genres" in x and "u:age" in x and "ctx:position" not in x
    for how in ("random", "time"):
        train, test = split_examples(data, how, seed=1)
        assert len(train) == 240 and len(test) == 60
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(300))
    train, test = split_examples(data, "time")
    assert data.times[train].max() <= data.times[test].min()
    a, _ = split_examples(data, "random", seed=1)
    b, _ = split_examples(data, "random", seed=2)
    assert not np.array_equal(a, b)


def test_a_damaged_file_is_refused_unless_bad_rows_are_skipped(tmp_path):
    _write_ml100k(tmp_path, bad_rows=("7\t3\t\t880000001", "\t4\t5\t880000002", "8\t999\t4\t880000003", "9\t2\t5\t1234"))
    with pytest.raises(ConfigError, match="skip-bad-rows"):
        movielens_examples(tmp_path)
    data = movielens_examples(tmp_path, skip_bad_rows=True)
    assert len(data.xs) == 301
    assert data.notes["skipped_malformed"] == 2 and data.notes["skipped_unknown_id"] == 1
    assert data.notes["timestamp_outside_period"] == 1


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="towerstream")
    _train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _row(out: str, label: str) -> list[str]:
    """The fields after ``label`` of the first table line for it."""
    for line in out.splitlines():
        if line.startswith(label + " "):
            return line[len(label):].split()
    raise AssertionError(f"no row {label!r} in:\n{out}")


def test_train_cli_prints_every_model_the_ablations_the_paper_and_the_layout(tmp_path, capsys):
    _write_ml100k(tmp_path, n_ratings=400)
    rc = _cli(["train", "--dataset", "movielens", "--path", str(tmp_path), "--model", "ctr,two-tower,lr,dat,inttower",
               "--epochs", "3", "--batch-size", "40", "--ablations", "--split", "time", "--seeds", "0,1",
               "--no-retrieval"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "layout ml-100k: 12 users, 20 items, 400 ratings" in out
    assert "click rule: rating >= 4 is a click" in out
    assert "split: time 80/20 (seeds 0,1)" in out
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("model ")))
    assert lines[header + 1].startswith("  ctr seed 0 epoch 1/3: ")  # progress before the first row
    assert next(line for line in lines[header + 1:] if not line.startswith("  ")).startswith("ctr "), \
        "the CTR baseline is the first row"
    auc = float(_row(out, "two-tower")[0])
    assert auc > 0.9  # the rating is a function of the item: learnable from the item id
    assert _row(out, "two-tower")[1] == "±"
    for label in ("lr", "dat", "inttower", "IntTower -LightSE", "IntTower -FE", "IntTower -CIR", "DAT -AMM",
                  "DAT -CA"):
        assert 0.0 <= float(_row(out, label)[0]) <= 1.0
    assert "0.8974" in _row(out, "inttower") and "0.8697" in _row(out, "two-tower")  # the paper's, beside ours
    assert "Table 2" in out and "MovieLens-1M" in out and "COLD" in out
    # one progress line per model, seed and epoch, with events/s, loss and validation AUC
    progress = [line for line in lines if line.startswith("  two-tower seed ")]
    assert len(progress) == 6
    assert all("events/s" in p and "loss" in p and "val AUC" in p for p in progress)


def test_progress_reports_each_epoch_with_validation_auc(tmp_path):
    _write_ml100k(tmp_path, n_ratings=300)
    data = movielens_examples(tmp_path)
    train, test = split_examples(data, "random")
    seen: list[Progress] = []
    result, _ = train_and_evaluate(lambda: make_learner("two-tower", seed=0), data, train, test, name="tt", epochs=2,
                                   batch_size=10, progress=seen.append, progress_every=5)
    ends = [p for p in seen if p.done == p.total]
    assert [p.epoch for p in ends] == [1, 2] and all(p.val_auc is not None and p.loss is not None for p in ends)
    assert any(p.done < p.total for p in seen), "progress within an epoch too"
    assert result.n_train == 216 and len(result.val_auc) == 2  # 10% of the 240 training rows validate


def _write_csv_layout(root, n_ratings: int = 300) -> None:
    """The current MovieLens CSV layout; half-star ratings: even items 4.5, odd 2.5 (and a few 3.5)."""
    rng = random.Random(0)
    (root / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f'{i},"Movie {i}, The (1995)",{"Comedy|Drama" if i % 3 else "(no genres listed)"}\n' for i in range(1, 21)))
    rows = []
    for k in range(n_ratings):
        u, i = rng.randint(1, 12), rng.randint(1, 20)
        rating = 4.5 if i % 2 == 0 else (3.5 if k % 7 == 0 else 2.5)
        rows.append(f"{u},{i},{rating},{1_500_000_000 + k}\n")
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(rows))


def test_train_on_the_csv_layout_with_half_stars(tmp_path, capsys):
    _write_csv_layout(tmp_path)
    data = movielens_examples(tmp_path)
    assert data.layout == "ml-csv" and len(data.xs) == 300
    # rating >= 4 is a click: 4.5 is, 3.5 is not
    item = np.array([int(x["item_id"]) for x in data.xs])
    np.testing.assert_array_equal(data.ys, (item % 2 == 0).astype(float))
    assert _cli(["train", "--dataset", "movielens", "--path", str(tmp_path), "--model", "ctr,lr",
                 "--batch-size", "50", "--no-retrieval"]) == 0
    out = capsys.readouterr().out
    assert "layout ml-csv: 12 users, 20 items, 300 ratings" in out and "ctr " in out


def test_inttower_paper_protocol_drops_rating_3(tmp_path, capsys):
    _write_ml100k(tmp_path, n_ratings=200)
    text = (tmp_path / "u.data").read_text().splitlines()
    text[:20] = [line.rsplit("\t", 2)[0] + "\t3\t" + line.rsplit("\t", 1)[1] for line in text[:20]]
    (tmp_path / "u.data").write_text("\n".join(text) + "\n")
    project = movielens_examples(tmp_path)
    paper = movielens_examples(tmp_path, protocol="inttower-paper")
    train, test = split_examples(paper, "random")
    leaky = with_leaky_mean_ratings(paper, (train, test))
    i = int(test[0])
    same_user = [j for j in test.tolist() if paper.xs[j]["user_id"] == paper.xs[i]["user_id"]]
    want = np.mean(paper.ratings[same_user])  # the test part's own ratings: the leak
    assert leaky.xs[i]["u:mean_rating"] == f"{round(2 * want) / 2:.1f}" and "u:mean_rating" not in paper.xs[i]
    assert len(project.xs) == 200 and len(paper.xs) == 180
    assert paper.ys.sum() == project.ys.sum()  # 3 was a non-click anyway: only non-clicks went
    assert _cli(["train", "--dataset", "movielens", "--path", str(tmp_path), "--model", "two-tower",
                 "--protocol", "inttower-paper", "--no-retrieval", "--leaky-row"]) == 0
    out = capsys.readouterr().out
    assert "rating 3 dropped" in out and "batch 2048" in out
    assert 0.0 <= float(_row(out, "two-tower LEAKY means")[0]) <= 1.0 and "leak the test labels" in out
    with pytest.raises(ConfigError, match="random split"):
        _cli(["train", "--dataset", "movielens", "--path", str(tmp_path), "--protocol", "inttower-paper",
              "--split", "time"])


def test_bad_folder_error_lists_the_layouts_and_gives_no_advice_that_fails(tmp_path):
    (tmp_path / "notes.txt").write_text("not MovieLens\n")
    with pytest.raises(ConfigError) as err:
        _cli(["train", "--dataset", "movielens", "--path", str(tmp_path)])
    message = str(err.value)
    for name in ("ml-100k", "u.data", "u.user", "u.item", "ml-1m", "ratings.dat", "users.dat", "movies.dat",
                 "ml-csv", "ratings.csv", "movies.csv"):
        assert name in message
    assert "--skip-bad-rows" not in message  # skipping rows cannot help a folder in no layout


def test_the_advice_of_a_damaged_file_error_works(tmp_path, capsys):
    _write_ml100k(tmp_path, bad_rows=("7\t3\t\t880000001",))
    argv = ["train", "--dataset", "movielens", "--path", str(tmp_path), "--model", "ctr", "--no-retrieval"]
    with pytest.raises(ConfigError, match="--skip-bad-rows") as err:
        _cli(argv)
    advice = "--skip-bad-rows"
    assert advice in str(err.value)
    assert _cli([*argv, advice]) == 0  # run the advice the error gave
    assert "damaged file read leniently" in capsys.readouterr().out


def test_retrieval_metrics_in_the_train_output(tmp_path, capsys):
    _write_ml100k(tmp_path, n_ratings=400)
    assert _cli(["train", "--dataset", "movielens", "--path", str(tmp_path), "--model", "two-tower",
                 "--epochs", "1", "--batch-size", "50"]) == 0
    out = capsys.readouterr().out
    assert "retrieval: time split" in out
    for label in ("popularity", "two-tower"):
        fields = _row(out.split("retrieval: time split")[1], label)
        assert len([f for f in fields if f.replace(".", "").isdigit()]) >= 9
    assert "exact (flat)" in out and "served flat" in out and "forced ivf_flat (nlist" in out


def test_train_cli_simulator_and_bad_arguments(capsys):
    assert _cli(["train", "--dataset", "simulator", "--events", "600", "--batch-size", "100",
                 "--model", "two-tower,ctr"]) == 0
    out = capsys.readouterr().out
    assert "seed 0, first 600 impressions" in out and "ctr" in out
    assert 0.5 < float(_row(out, "true model")[0]) <= 1.0  # the ceiling, beside the learners
    assert _cli(["train", "--dataset", "simulator", "--events", "300", "--model", "lr", "--feature-strength", "0.2",
                 "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "seed 3, feature strength 0.2" in out and "true model" in out
    with pytest.raises(ConfigError, match="--feature-strength"):
        _cli(["train", "--dataset", "simulator", "--feature-strength", "1.5"])
    with pytest.raises(ConfigError, match="--model"):
        _cli(["train", "--dataset", "simulator", "--model", "deepfm"])
    with pytest.raises(ConfigError, match="--seeds"):
        _cli(["train", "--dataset", "simulator", "--seeds", "0,x"])
    with pytest.raises(ConfigError, match="--path"):
        _cli(["train", "--dataset", "movielens"])


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    mid = Progress("tt", 1, 2, 50, 100, 1000.0, 0.5)
    end = Progress("tt", 1, 2, 100, 100, 1000.0, 0.4, 0.75, 0.6)
    tty = Terminal()
    bar = _train_cli._ProgressPrinter(tty, "tt")
    bar(mid)
    bar(end)
    assert tty.getvalue().count("\r") == 2 and "[" + "#" * 12 + "." * 12 + "]" in tty.getvalue()
    assert tty.getvalue().endswith("val AUC 0.7500\n")
    plain = io.StringIO()
    lines = _train_cli._ProgressPrinter(plain, "tt")
    lines(mid)
    lines(end)
    assert plain.getvalue() == "  tt epoch 1/2: 1,000 events/s, loss 0.4000, val AUC 0.7500, val logloss 0.6000\n"
