"""Retraining: the recipe's pieces, the training data (base + reviewers + users), and python -m model.train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model import train as T
from review import scoring
from tests import review_fixtures as rf
from tests.review_fixtures import probs, square, upload

services, sqlite_url = rf.services, rf.sqlite_url  # fixtures


def test_recipe_round_trip_and_checks():
    r = T.Recipe(arch="resnet18", size=64, mean=None, std=None)
    assert T.Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert T.Recipe.from_dict({**T.DEMO_RECIPE.to_dict(), "unknown": 1}) == T.DEMO_RECIPE
    with pytest.raises(ValueError, match="architecture"):
        T.Recipe(arch="vgg")
    with pytest.raises(ValueError, match="valid_pct"):
        T.Recipe(valid_pct=1.0)


def test_validation_split_is_the_exports_and_stable():
    from review.export import valid_split

    items = [T.Item(Path(f"{i}.png"), str(i % 10), f"{i:064x}") for i in range(2000)]
    mask = T.valid_mask(items, 0.2)
    assert 0.17 < mask.mean() < 0.23
    np.testing.assert_array_equal(mask, scoring.unit_hash([it.sha256 for it in items], "valid:") < 0.2)  # by hash
    np.testing.assert_array_equal(mask, valid_split([it.sha256 for it in items], [it.label for it in items], 0.2))
    np.testing.assert_array_equal(T.valid_mask(items[::-1], 0.2), mask[::-1])  # per image, not per position


def test_new_head_keeps_known_classes():
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    new = T.adapt_head(model, ("a", "b", "c"), ("a", "b", "c", "d"))
    assert new[2].out_features == 4 and model[2].out_features == 3  # a copy; the parent is untouched
    torch.testing.assert_close(new[2].weight[:3], model[2].weight)
    torch.testing.assert_close(new[2].bias[:3], model[2].bias)
    torch.testing.assert_close(new[0].weight, model[0].weight)
    reordered = T.adapt_head(model, ("a", "b", "c"), ("c", "a", "b", "z"))
    torch.testing.assert_close(reordered[2].weight[0], model[2].weight[2])
    assert T.adapt_head(model, ("a", "b", "c"), ("a", "b", "c"))[2].out_features == 3


def test_training_data_applies_reviews_and_user_confirmations(services, sqlite_url, tmp_path):
    from review import trainset
    from review.imagestore import ImageStore

    kit = services(sqlite_url)
    settings = kit.store.settings
    folder = tmp_path / "ds"
    colours = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}
    for i, (name, rgb) in enumerate(colours.items()):
        for j in range(3):
            (folder / name).mkdir(parents=True, exist_ok=True)
            square(rgb, size=12, mark=10 * i + j + 1).save(folder / name / f"{j}.png")
    (folder / "red" / "bad.txt.png").write_text("not an image")
    base_store = ImageStore(tmp_path / "cache")
    base, report = trainset.load_base(folder, base_store, max_bytes=settings.max_upload_bytes,
                                      max_pixels=settings.max_pixels)
    assert (report.files, report.images, len(report.rejected)) == (10, 9, 1)
    # the audit logged the dataset; a reviewer relabels one image and marks another out of domain
    from review.audit import label_scores, queue_records

    p = np.tile(probs(0.2, 0.3, 0.5), (len(base), 1))
    for b in base:
        kit.store.images.put_bytes(base_store.read(b.sha256))
    quality, issues = label_scores(base, rf.VOCAB, p)
    queue_records(kit.store, kit.model, base, p, quality, issues, queue="all")
    first = kit.desk.next_item("alice")
    kit.desk.decide("alice", first.item_id, action="relabel",
                    label=next(c for c in rf.VOCAB if c != first.claimed_labels[0]), idempotency_key="1")
    second = kit.desk.next_item("alice")
    kit.desk.decide("alice", second.item_id, action="out_of_domain", label=None, idempotency_key="2")
    # traffic: one upload a reviewer settles, one a user confirms, one a user only claims (unverified: not used)
    reviewed_id = kit.log(**upload(square((1, 2, 3))), probs=probs(0.5, 0.3, 0.2), source="upload", latency_ms=1)
    confirmed_id = kit.log(**upload(square((4, 5, 6))), probs=probs(0.1, 0.8, 0.1), source="upload", latency_ms=1)
    claimed_id = kit.log(**upload(square((7, 8, 9))), probs=probs(0.1, 0.8, 0.1), source="upload", latency_ms=1)
    kit.store.flush()
    kit.store.record_feedback(confirmed_id, correct=True, claimed_label=None)
    kit.store.record_feedback(claimed_id, correct=False, claimed_label="blue")
    kit.store.flush()
    while (item := kit.desk.next_item("alice", reason="low_confidence")) is not None:
        if item.prediction_id == reviewed_id:
            kit.desk.decide("alice", item.item_id, action="relabel", label="green", idempotency_key="3")
        else:
            kit.desk.decide("alice", item.item_id, action="skip", label=None, idempotency_key=f"s{item.item_id}")
    people = kit.store.transaction(lambda s: trainset.reviewed(s, kit.store.images), read=True)
    data = trainset.assemble(base, report, base_store, people, kit.store.images, parent_vocab=("red", "green", "blue"))
    labels = {it.sha256: (it.label, it.source) for it in data.items}
    assert second.image_sha256 not in labels  # out of domain: dropped
    assert labels[first.image_sha256][1] == "dataset-reviewed" and labels[first.image_sha256][0] != \
        first.claimed_labels[0]
    sources = data.snapshot["counts"]["by_source"]
    assert sources == {"dataset": 7, "dataset-reviewed": 1, "reviewed": 1, "user-confirmed": 1}
    assert data.snapshot["relabelled"] == 1 and data.snapshot["dropped"] == {"out_of_domain": 1}
    assert data.vocab == ("red", "green", "blue") and data.snapshot["counts"]["total"] == 10
    assert all(Path(it.path).is_file() for it in data.items)


def test_retrain_cli_new_class_report_and_registry(tmp_path, monkeypatch, capsys):
    """python -m model.train on the demo model with a dataset that has a class the demo lacks."""
    from sklearn.datasets import load_digits

    from model import versions
    from model.demo import DEMO_SHA256, render
    from model.report import report_html
    from model.retrain import main
    from review.store import ReviewStore
    from settings import Settings

    digits = load_digits()
    folder = tmp_path / "ds"
    for i in range(60):
        (folder / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
        render(digits.data[i]).save(folder / str(digits.target[i]) / f"{i}.png")
    odd = "<b>x"  # a class name is data: the report must escape it
    (folder / odd).mkdir()
    for i in range(60, 70):
        render(digits.data[i][::-1]).save(folder / odd / f"{i}.png")  # distinct images (duplicates count once)
    monkeypatch.setenv("LOUPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOUPE_BACKEND", "torch")
    monkeypatch.delenv("LOUPE_MODEL_PATH", raising=False)
    assert main(["--base", str(folder), "--epochs", "1", "--note", "first retrain"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert "img/s" in err and "new classes: a new head" in err and "Registered" in err
    settings = Settings()
    store = ReviewStore(settings)
    try:
        rec = store.transaction(lambda s: versions.get(s, result["version"]), read=True)
        parent = store.transaction(versions.current, read=True)
    finally:
        store.close()
    assert rec.status == "candidate" and parent.sha256 == DEMO_SHA256 and rec.parent == parent.version
    assert rec.vocab == tuple(str(d) for d in range(10)) + (odd,) and rec.note == "first retrain"
    assert rec.data["counts"]["by_source"]["dataset"] == 70 and rec.recipe["size"] == 32
    assert set(rec.metrics["per_class"]) == set(rec.vocab) and 0 <= rec.metrics["error_rate"] <= 1
    report = rec.report_dir(settings.data_dir)
    assert {p.name for p in report.iterdir()} == {"report.json", "confusion.png", "top_losses.png", "data.csv"}
    assert rec.export_path(settings.data_dir) == settings.data_dir / "models" / rec.sha256 / "export.pkl"
    page = report_html(rec, settings.data_dir)
    assert "&lt;b&gt;x" in page and odd not in page and page.count("data:image/png;base64,") == 2
    predictor = versions.load_predictor(rec, settings)  # the pinned path, with the registry's sha256
    assert predictor.info.vocab == rec.vocab and predictor.info.version == rec.version
