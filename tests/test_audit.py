"""Out-of-fold dataset audit: label-quality scores (hand-checked), folds, queueing, idempotency, the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from review import scoring
from review.types import DATASET, HIGH_LOSS

# labels and probabilities worked through by hand below
Y = [0, 1, 2, 0]
P = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])


def test_self_confidence_and_normalized_margin_by_hand():
    np.testing.assert_allclose(scoring.self_confidence(Y, P), [0.7, 0.6, 0.1, 0.2])
    # (p[label] - best other + 1) / 2: (0.7-0.2+1)/2, (0.6-0.3+1)/2, (0.1-0.5+1)/2, (0.2-0.7+1)/2
    np.testing.assert_allclose(scoring.normalized_margin(Y, P), [0.75, 0.65, 0.3, 0.25])


def test_confident_thresholds_and_issues_by_hand():
    # class 0: items 0 and 3 -> (0.7 + 0.2) / 2; class 1: item 1 -> 0.6; class 2: item 2 -> 0.1
    np.testing.assert_allclose(scoring.confident_thresholds(Y, P), [0.45, 0.6, 0.1])
    # item 0: confident in 0 and 2 -> the more probable, 0 = its label; item 1: 1 and 2 -> 1 = its label;
    # item 2: 0 and 2 -> 0, labelled 2: an issue; item 3: 1 and 2 -> 1, labelled 0: an issue
    np.testing.assert_array_equal(scoring.confident_guess(Y, P), [0, 1, 0, 1])
    np.testing.assert_array_equal(scoring.likely_label_issues(Y, P), [False, False, True, True])


def test_one_confident_class_wins_over_the_argmax_and_missing_classes_never_count():
    # thresholds 0.6 / 0.4 / inf: p = (0.5, 0.45, 0.05) labelled 1 is confident in class 1 only (0.5 < 0.6),
    # so it is no issue although the model's top class is 0; nothing is confident -> guess -1, no issue.
    p = np.array([[0.5, 0.45, 0.05], [0.3, 0.3, 0.4]])
    t = [0.6, 0.4, math.inf]
    np.testing.assert_array_equal(scoring.confident_guess([1, 0], p, t), [1, -1])
    assert not scoring.likely_label_issues([1, 0], p, t).any()
    # a class nobody is labelled with gets an infinite threshold (cleanlab's rule)...
    assert scoring.confident_thresholds([0, 0], p)[2] == math.inf


def test_a_class_nobody_is_labelled_with_can_still_be_the_true_class():
    # ...but the guess gives it the mean of the other thresholds: one image labelled red that the model calls
    # blue at 0.8 is a likely issue (cleanlab's infinite threshold would never flag it)
    p = np.array([[0.1, 0.1, 0.8]])
    assert scoring.likely_label_issues([0], p)[0] and scoring.confident_guess([0], p)[0] == 2


def test_label_issue_candidates_are_disagreements_or_confident_learning_flags():
    # thresholds 0.6 / 0.4 / 0.1. Items 0 and 1: argmax = label, and the confident guess too. Items 2 and 3: the
    # argmax is another class. Item 4 = (0.5, 0.45, 0.05): only class 1 is confident (0.5 < 0.6, 0.45 >= 0.4,
    # 0.05 < 0.1), so labelled 0 it is flagged by confident learning alone (its argmax IS its label), and
    # labelled 1 by the disagreement alone (confident learning agrees with the label 1).
    p = np.vstack([P, [[0.5, 0.45, 0.05]]])
    t = [0.6, 0.4, 0.1]
    np.testing.assert_array_equal(scoring.label_issue_candidates(Y + [0], p, t), [False, False, True, True, True])
    np.testing.assert_array_equal(scoring.label_issue_candidates(Y + [1], p, t), [False, False, True, True, True])


def test_adjusted_self_confidence_by_hand():
    # item 0: p - t = (0.25, -0.4, 0.0); shifted by 0.4 -> (0.65, 0, 0.4), sum 1.05 -> 0.65 / 1.05
    # item 2: p - t = (0.05, -0.2, 0.0); shifted by 0.2 -> (0.25, 0, 0.2), sum 0.45 -> 0.2 / 0.45
    adj = scoring.adjusted_self_confidence(Y, P)
    assert adj[0] == pytest.approx(0.65 / 1.05) and adj[2] == pytest.approx(0.2 / 0.45)


def test_label_quality_dispatch_and_errors():
    for method in scoring.LABEL_QUALITY_METHODS:
        q = scoring.label_quality(Y, P, method)
        assert q.shape == (4,) and ((q >= 0) & (q <= 1)).all()
    with pytest.raises(ValueError, match="unknown label quality"):
        scoring.label_quality(Y, P, "entropy")
    with pytest.raises(ValueError, match="range"):
        scoring.self_confidence([3, 0, 0, 0], P)
    with pytest.raises(ValueError, match="shape"):
        scoring.self_confidence([0, 1], P)


def test_label_issue_priority_is_the_dataset_tier_ordered_by_quality():
    q = np.array([0.9, 0.05, 0.5, 1.0])
    prio = scoring.label_issue_priority(q)
    assert ((prio >= 3) & (prio < 4)).all()
    assert list(np.argsort(-prio)) == [1, 2, 0, 3]
    # read as a loss: an audit item with self-confidence exp(-2) ranks exactly like a high-loss item of loss 2
    high_loss = scoring.queue_priority([HIGH_LOSS], [0.9], [0.8], [2.0])
    assert scoring.label_issue_priority([math.exp(-2.0)])[0] == pytest.approx(high_loss[0])
    assert scoring.queue_priority([DATASET], [0.5], [0.1], [-math.log(0.5)])[0] == pytest.approx(prio[2])


# --- the audit job and the import, with stand-in models (the real training runs in tests/test_spiral.py) --------
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from review import audit, jobs  # noqa: E402
from tests import review_fixtures as rf  # noqa: E402
from tests.review_fixtures import VOCAB, square  # noqa: E402

services, sqlite_url = rf.services, rf.sqlite_url  # fixtures
COLOURS = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}


def colour_folder(root: Path, per_class: int = 6, wrong: int = 2, extra: str | None = None) -> Path:
    """per_class squares per colour folder; the first `wrong` of each are filed under the next colour."""
    names = list(COLOURS)
    for c, name in enumerate(names):
        for i in range(per_class):
            folder = names[(c + 1) % 3] if i < wrong else name
            (root / folder).mkdir(parents=True, exist_ok=True)
            square(COLOURS[name], size=12, mark=i + 1).save(root / folder / f"{name}{i}.png")
    if extra:
        (root / extra).mkdir(parents=True, exist_ok=True)
        square((9, 9, 9), size=12).save(root / extra / "x.png")
    return root


def true_colour(img) -> int:
    return int(np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0).argmax())


def colour_probs(images) -> np.ndarray:
    """A stand-in model that sees the true colour (VOCAB order: red, green, blue)."""
    out = np.full((len(images), 3), 0.05)
    out[np.arange(len(images)), [true_colour(im) for im in images]] = 0.9
    return out.astype(np.float32)


def test_folds_are_stratified_and_fixed_by_content():
    shas = [f"{i:064x}" for i in range(60)]
    labels = ["a"] * 30 + ["b"] * 21 + ["c"] * 9
    folds = audit.fold_ids(shas, labels, 3)
    for lab in "abc":
        counts = np.bincount(folds[np.array(labels) == lab], minlength=3)
        assert counts.max() - counts.min() <= 1  # each class spread evenly over the folds
    order = np.random.RandomState(0).permutation(60)
    again = audit.fold_ids([shas[i] for i in order], [labels[i] for i in order], 3)
    assert (again == folds[order]).all()  # the listing order does not matter: the content decides
    with pytest.raises(Exception, match="at least 2"):
        audit.fold_ids(shas, labels, 1)


def test_audit_queues_out_of_fold_view_best_first_and_is_idempotent(services, sqlite_url, tmp_path, monkeypatch):
    from model.train import Recipe

    calls = []

    def fake_out_of_fold(base, images, vocab, recipe, folds, progress=True):
        calls.append(len(base))
        from PIL import Image

        probs = []
        for b in base:
            with Image.open(images.path(b.sha256)) as im:
                probs.append(colour_probs([im.convert("RGB")])[0])
        return np.stack(probs), 1.0, 1000.0

    monkeypatch.setattr(audit, "out_of_fold", fake_out_of_fold)
    kit = services(sqlite_url)
    folder = colour_folder(tmp_path / "ds", extra="purple")
    report = audit.audit_dataset(kit.store, folder, vocab=VOCAB, name="colours", recipe=Recipe(), folds=3,
                                 progress=False)
    assert report.model_version.startswith("colours-oof@") and report.unknown_labels == {"purple": 1}
    assert (report.images, report.imported, report.already, report.queued, report.flagged) == (18, 18, 0, 6, 6)
    assert report.review_at == "http://127.0.0.1:7860/review/"
    seen = []
    while (item := kit.desk.next_item("alice", reason="dataset")) is not None:
        seen.append(item)
        kit.desk.decide("alice", item.item_id, action="skip", label=None, idempotency_key=str(item.item_id))
    assert len(seen) == 6 and all(i.model_version == report.model_version and i.source == "dataset" for i in seen)
    # the reviewer sees the out-of-fold model's view: its probabilities, against the dataset's label
    assert all(i.probs[i.predicted] == pytest.approx(0.9) and i.claimed_labels[0] != i.predicted for i in seen)
    # re-running the same audit logs nothing and trains nothing
    again = audit.audit_dataset(kit.store, folder, vocab=VOCAB, name="colours", recipe=Recipe(), folds=3,
                                progress=False)
    assert (again.already, again.imported, again.queued) == (18, 0, 0) and calls == [18]
    assert kit.desk.counts()["predictions"] == 18


def test_import_is_idempotent_and_warns_about_the_models_training_images(services, sqlite_url, tmp_path):
    from model import versions

    kit = services(sqlite_url)
    folder = colour_folder(tmp_path / "ds")
    pipeline = kit.pipeline(colour_probs)
    first = jobs.import_dataset(kit.store, pipeline, folder)
    assert (first.imported, first.already, first.queued, first.trained_on) == (18, 0, 6, None)
    second = jobs.import_dataset(kit.store, pipeline, folder)
    assert (second.imported, second.already, second.queued) == (0, 18, 0)
    assert kit.desk.counts()["predictions"] == 18  # not doubled
    # the served model was trained by Loupe on some of these images: the import says how many
    from sqlalchemy import select

    from review.db import Prediction

    shas = sorted(kit.store.transaction(lambda s: set(s.scalars(select(Prediction.image_sha256))), read=True))[:5]
    kit.store.transaction(lambda s: versions.register(
        s, name=kit.model.name, sha256=kit.model.sha256, path="models/x/export.pkl", vocab=VOCAB,
        now=kit.store.clock(), training_images=[(sha, "red", "train", "dataset") for sha in shas]))
    third = jobs.import_dataset(kit.store, pipeline, folder)
    assert third.trained_on == 5


def test_cli_unpinned_model_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    from review.__main__ import main

    model = tmp_path / "export.pkl"
    model.write_bytes(b"not checked before the pin")
    monkeypatch.setenv("LOUPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOUPE_MODEL_PATH", str(model))
    monkeypatch.delenv("LOUPE_MODEL_SHA256", raising=False)
    for command in (["import-dataset", str(tmp_path)], ["audit-dataset", str(tmp_path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: Refusing to load") and "LOUPE_MODEL_SHA256=" in err and "Traceback" not in err


def test_cli_import_reports_progress_unknown_labels_repeats_and_where_to_review(tmp_path, monkeypatch, capsys):
    """The real CLI on the demo model: a digits folder with a class the model does not have, imported twice."""
    from sklearn.datasets import load_digits

    from model.demo import render
    from review.__main__ import main

    digits = load_digits()
    for i in range(30):
        path = tmp_path / "ds" / str(digits.target[i]) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render(digits.data[i]).save(path)
    (tmp_path / "ds" / "cat").mkdir()
    render(digits.data[0]).save(tmp_path / "ds" / "cat" / "c.png")
    (tmp_path / "ds" / "dog").mkdir()
    render(digits.data[1]).save(tmp_path / "ds" / "dog" / "d.png")
    monkeypatch.setenv("LOUPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOUPE_BACKEND", "torch")  # no ONNX conversion: this test is about the CLI
    monkeypatch.setenv("LOUPE_PORT", "7999")
    monkeypatch.delenv("LOUPE_MODEL_PATH", raising=False)
    assert main(["import-dataset", str(tmp_path / "ds")]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert (report["imported"], report["already"], report["unknown_labels"]) == (30, 0, {"cat": 1, "dog": 1})
    assert "scoring" in err and "img/s" in err  # a progress bar with the rate
    assert "'cat' (1), 'dog' (1)" in err and "not among the model's classes" in err
    assert "http://127.0.0.1:7999/review/ (Reason: dataset)" in err
    assert main(["import-dataset", str(tmp_path / "ds")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["already"] == 30 and "30 images were already logged" in err


def test_a_model_that_contradicts_most_labels_is_called_out(services, sqlite_url, tmp_path, capsys):
    from review.__main__ import _tell

    kit = services(sqlite_url)

    def wrong(images):  # always one class off
        return np.roll(colour_probs(images), 1, axis=1)

    report = jobs.import_dataset(kit.store, kit.pipeline(wrong), colour_folder(tmp_path / "ds", wrong=0))
    assert report.disagreement == 1.0
    _tell(report)
    assert "contradicts 100% of the labels" in capsys.readouterr().err
