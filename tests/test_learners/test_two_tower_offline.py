"""The offline protocol and ``towerstream train`` on a tiny MovieLens-format directory."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from learners import _train_cli
from learners.two_tower.offline import movielens_examples, split_examples
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


def test_train_cli_prints_auc_per_model_and_the_ablation_table(tmp_path, capsys):
    _write_ml100k(tmp_path, n_ratings=400)
    rc = _cli(["train", "--dataset", "movielens", "--path", str(tmp_path), "--model", "two-tower,lr",
               "--epochs", "4", "--batch-size", "40", "--ablations", "--split", "time"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "split: time 80/20" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["two-tower"], ["lr"])}
    assert set(rows) == {"two-tower", "lr"}
    auc = float(rows["two-tower"][1])
    assert auc > 0.9  # the rating is a function of the item: learnable from the item id
    for label in ("IntTower (full)", "-LightSE", "-FE", "-CIR"):
        assert label in out
    assert "IntTower paper" in out


def test_train_cli_simulator_and_bad_arguments(capsys):
    assert _cli(["train", "--dataset", "simulator", "--events", "600", "--batch-size", "100",
                 "--model", "two-tower,ctr"]) == 0
    out = capsys.readouterr().out
    assert "seed 0, first 600 impressions" in out and "ctr" in out
    with pytest.raises(ConfigError, match="--model"):
        _cli(["train", "--dataset", "simulator", "--model", "deepfm"])
    with pytest.raises(ConfigError, match="--path"):
        _cli(["train", "--dataset", "movielens"])
