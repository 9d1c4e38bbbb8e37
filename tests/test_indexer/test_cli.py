"""`towerstream index build-once|list|rollback` on a real two-tower checkpoint (no Kafka)."""

from __future__ import annotations

import orjson
import pytest

from indexer.artifacts import ArtifactStore
from indexer.handle import load_handle
from indexer.testing import catalogue_records, labelled_impressions
from learners.checkpoint import save_checkpoint
from learners.registry import make_learner
from app.cli import main
from streams.events import encode_event, event_from_dict


def _impression_lines(xs, ys) -> bytes:
    lines = []
    for n, (x, y) in enumerate(zip(xs, ys)):
        e = event_from_dict({
            "schema_version": 1, "kind": "impression", "event_id": f"h{n}", "event_time": 1.0,
            "user_id": x["user_id"], "request_id": f"r{n}", "user_features": {"topic": x["u:topic"]},
            "item_id": x["item_id"], "item_features": {"topic": x["i:topic"]}, "label": int(y), "position": 0,
        })
        lines.append(encode_event(e))
    return b"\n".join(lines) + b"\n"


@pytest.mark.slow
def test_build_once_list_and_rollback_from_a_two_tower_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    learner = make_learner("two-tower", seed=0, field_dim=8, hidden=(16,), out_dim=16)
    xs, ys = labelled_impressions(128, n_items=300, seed=1)
    learner.learn_many(xs, ys)
    ckpt = tmp_path / "model.ckpt"
    save_checkpoint(ckpt, learner, {"towerstream.events": {0: 128}}, events_learned=128)
    catalogue = tmp_path / "items.jsonl"
    catalogue.write_bytes(b"\n".join(orjson.dumps(r) for r in catalogue_records(300)))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_bytes(_impression_lines(*labelled_impressions(300, n_items=300, seed=2)))
    root = tmp_path / "index"
    common = ["--root", str(root), "--checkpoint", str(ckpt), "--catalogue", str(catalogue),
              "--recall-k", "10", "--max-auc-drop", "0.05"]

    assert main(["index", "build-once", *common, "--held-out", str(held_out)]) == 0
    catalogue.write_bytes(catalogue.read_bytes() + b'\n{"item_id": "new", "item_features": {"topic": "t1"}}\n')
    assert main(["index", "build-once", *common, "--held-out", str(held_out)]) == 0
    store = ArtifactStore(root)
    assert store.current() == 2
    m = store.get(2).manifest
    assert m["item_count"] == 301 and m["checkpoint"]["events_learned"] == 128
    assert m["checkpoint"]["path"] == str(ckpt) and m["checkpoint"]["offsets"] == {"towerstream.events": {"0": 128}}
    assert m["quality"]["held_out_examples"] == 300 and m["quality"]["auc"] is not None

    # The served index answers as the frozen towers do: exact (flat) top-k by <user, item>.
    handle = load_handle(store.current_info().path)
    users = learner.encode_users(xs[:3])
    items = learner.encode_items([{"item_id": r["item_id"], "i:topic": r["item_features"]["topic"]}
                                  for r in catalogue_records(300)])
    best = (users @ items.T).argmax(axis=1)
    assert handle.search(users, k=1).ids[:, 0].tolist() == [f"i{j}" for j in best]

    capsys.readouterr()
    assert main(["index", "list", "--root", str(root)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[1].split()[0] == "1" and listing[2].split()[:2] == ["*", "2"]

    assert main(["index", "rollback", "1", "--root", str(root)]) == 0
    assert "serving version 1 (was 2); not announced" in capsys.readouterr().out
    assert store.current() == 1
    assert main(["index", "rollback", "9", "--root", str(root)]) == 2
    assert "version 9 does not exist" in capsys.readouterr().err
    assert store.current() == 1

    assert main(["index", "rollback", "2", "--pin", "--root", str(root)]) == 0
    assert main(["index", "build-once", *common]) == 0  # skipped: pinned
    assert "pinned to version 2" in capsys.readouterr().err
    assert store.current() == 2 and store.latest().version == 2
    assert main(["index", "unpin", "--root", str(root)]) == 0
    assert main(["index", "build-once", *common]) == 0
    assert store.current() == 3
