
import csv
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from model.demo import DEMO_EXAMPLES_DIR, DEMO_NAME, VOCAB
from model.predictor import ModelInfo
from review import jobs, scoring
from review.export import TEXT_LABELS_CALL, valid_split
from review.types import ReviewError
from tests import review_fixtures as rf
from tests.browser_support import REPO
from tests.review_fixtures import probs, square, upload

services, sqlite_url = rf.services, rf.sqlite_url  # fixtures

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
DIGITS = ModelInfo(name=DEMO_NAME, sha256="cd" * 32, vocab=VOCAB, backend="onnx")  # the demo model's classes


def reviewed_service(services, url, n_per_class=9):
    """Coloured squares, all queued (low confidence); reviewers give every one its true colour, except three."""
    svc = services(url)
    for i in range(n_per_class):
        for cls, rgb in COLOURS.items():
            # the model is unsure and sometimes wrong: predicts red for every third image
            p = probs(0.5, 0.3, 0.2) if i % 3 == 0 else probs(*(0.5 if c == cls else 0.25 for c in COLOURS))
            svc.log(**upload(square(rgb, size=32, mark=i + 1)), probs=p, source="upload", latency_ms=1)
    svc.store.flush()
    outcome = {}
    n = 0
    while (item := svc.desk.next_item("alice")) is not None:
        true = next(c for c, rgb in COLOURS.items() if svc_pixel(svc, item) == rgb)
        if n in (0, 1):
            action, label = "out_of_domain", None
        elif n == 2:
            action, label = "bad_image", None
        elif item.predicted == true:
            action, label = "confirm", None
        else:
            action, label = "relabel", true
        assert svc.desk.decide("alice", item.item_id, action=action, label=label, idempotency_key=f"k{n}").ok
        outcome[item.image_sha256] = label or (item.predicted if action == "confirm" else action)
        n += 1
    svc.desk.undo("alice", idempotency_key="undo")  # re-decide the last one: the export must use the new decision
    item = svc.desk.next_item("alice")
    assert svc.desk.decide("alice", item.item_id, action="out_of_domain", label=None, idempotency_key="again").ok
    outcome[item.image_sha256] = "out_of_domain"
    return svc, outcome


def svc_pixel(svc, item):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(svc.desk.image_bytes(item.image_sha256))) as im:
        return im.getpixel((20, 20))


def test_export_layout(services, sqlite_url, tmp_path):
    svc, outcome = reviewed_service(services, sqlite_url)
    out = tmp_path / "export"
    report = jobs.export_reviewed(svc.store, out, valid_pct=0.3)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert list(rows[0]) == ["fname", "label", "is_valid"]
    expected = {sha: lab for sha, lab in outcome.items() if lab not in ("out_of_domain", "bad_image")}
    assert {r["fname"].split("/")[-1][:-4]: r["label"] for r in rows} == expected
    assert all((out / r["fname"]).is_file() and r["fname"].startswith("images/") for r in rows)
    assert {r["is_valid"] for r in rows} == {"True", "False"} and report.valid == sum(
        r["is_valid"] == "True" for r in rows)
    excluded = list(csv.DictReader(open(out / "excluded.csv")))
    assert sorted(e["reason"] for e in excluded) == ["bad_image", "out_of_domain", "out_of_domain", "out_of_domain"]
    decisions = [json.loads(line) for line in open(out / "decisions.jsonl")]
    assert len(decisions) == 27 + 2 and decisions[-2]["action"] == "undo"
    assert decisions[-2]["reverses_id"] == decisions[-3]["id"]
    again = jobs.export_reviewed(svc.store, tmp_path / "export2", valid_pct=0.3)  # deterministic split
    assert open(tmp_path / "export2" / "labels.csv").read() == open(out / "labels.csv").read()
    assert again.labelled == report.labelled == 23
    with pytest.raises(ReviewError, match="not empty"):
        jobs.export_reviewed(svc.store, out)


def test_export_folder_per_class(services, sqlite_url, tmp_path):
    svc, _ = reviewed_service(services, sqlite_url, n_per_class=3)
    out = tmp_path / "export"
    jobs.export_reviewed(svc.store, out, folders=True)
    for row in csv.DictReader(open(out / "labels.csv")):
        parent, _ = row["fname"].split("/")
        assert parent == row["label"] and (out / row["fname"]).is_file()  # fastai's parent_label layout too


def digits_reviewed(services, url, n_per_class: int):
    """The demo's example digits (a pixel changed per copy), each confirmed by a reviewer as its own digit."""
    svc = services(url, model=DIGITS)
    for digit in VOCAB:
        example = Image.open(DEMO_EXAMPLES_DIR / f"digit_{digit}.png").convert("RGB")
        # unsure but right: 0.3 on the true digit, 0.078 on each other one (queued as low confidence)
        p = probs(*(0.3 if d == digit else 0.7 / 9 for d in VOCAB))
        for i in range(n_per_class):
            img = example.copy()
            img.putpixel((i % img.width, 0), (i % 256, 128, 0))
            svc.log(**upload(img), probs=p, source="upload", latency_ms=1)
    svc.store.flush()
    n = 0
    while (item := svc.desk.next_item("alice")) is not None:
        assert svc.desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key=f"k{n}").ok
        n += 1
    assert n == n_per_class * len(VOCAB)
    return svc


def test_split_puts_every_class_on_both_sides(services, sqlite_url, tmp_path):
    """Two reviewed images per digit: each class has one image to train on and one to validate on (fastai errors
    on a validation label it never trained on), however the hashes fall."""
    svc = digits_reviewed(services, sqlite_url, n_per_class=2)
    report = jobs.export_reviewed(svc.store, tmp_path / "export")
    rows = list(csv.DictReader(open(tmp_path / "export" / "labels.csv")))
    sides = {d: sorted(r["is_valid"] for r in rows if r["label"] == d) for d in VOCAB}
    assert sides == {d: ["False", "True"] for d in VOCAB} and report.valid == len(VOCAB)


def test_split_is_the_hash_split_except_to_fill_an_empty_side():
    """Growing classes: an image keeps its side once its class has images on both sides by hash alone."""
    rng = np.random.default_rng(0)
    shas = [f"{i:064x}" for i in rng.integers(0, 2**62, 300)]
    labels = [("a", "b", "c")[i % 3] for i in range(len(shas))]
    by_hash = scoring.unit_hash(shas, "valid:") < 0.2
    forced_seen = 0
    for n in range(1, len(shas) + 1):  # one export after each new review
        mask = valid_split(shas[:n], labels[:n], 0.2)
        for cls in set(labels[:n]):
            members = [i for i in range(n) if labels[i] == cls]
            assert {bool(mask[i]) for i in members} == ({False} if len(members) == 1 else {False, True}), (n, cls)
            if len({bool(by_hash[i]) for i in members}) == 2:  # both sides by hash: every image on its hash's side,
                assert all(mask[i] == by_hash[i] for i in members)  # so it stays there as the class grows
            else:
                forced_seen += 1
    assert forced_seen > 0  # the small-class case was exercised
    assert 0.15 < mask.mean() < 0.25  # still a 20% split at scale
    with pytest.raises(ReviewError, match="valid_pct"):
        valid_split(shas, labels, 0.0)


def fastai():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's import-time FutureWarnings
        from fastai.vision.all import CrossEntropyLossFlat, ImageDataLoaders, Learner, Resize, accuracy
    return CrossEntropyLossFlat, ImageDataLoaders, Learner, Resize, accuracy


def train_one_epoch(dls) -> tuple[float, float, float]:
    from torch import nn

    loss, _, learner, _, accuracy = fastai()
    tiny = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, len(dls.vocab)))
    learn = learner(dls, tiny, loss_func=loss(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    return tuple(learn.recorder.values[-1])


# bs and num_workers are the only additions to the README's call: 20 images are fewer than the default batch of 64
# (fastai drops the incomplete last training batch), and worker processes only slow a test this small.
SMALL = {"bs": 4, "num_workers": 0}


@pytest.mark.filterwarnings("ignore::pandas.errors.ParserWarning")  # fastai's own read_csv(delimiter=None)
def test_export_trains_with_the_documented_calls(services, sqlite_url, tmp_path):
    """The demo's digits: the README's from_csv call trains and validates as is (vocab: the model's classes, read
    as numbers by pandas, which the export's note says); the documented text call gives the model's vocab exactly."""
    _, ImageDataLoaders, _, Resize, _ = fastai()
    import pandas as pd

    svc = digits_reviewed(services, sqlite_url, n_per_class=2)
    out = tmp_path / "out"
    report = jobs.export_reviewed(svc.store, out)

    dls = ImageDataLoaders.from_csv(out, valid_col="is_valid", item_tfms=Resize(224), **SMALL)
    assert len(dls.valid_ds) == report.valid == 10 and len(dls.train_ds) == 10
    assert [str(c) for c in dls.vocab] == list(VOCAB)  # the same classes in the model's order: a head lines up
    train_loss, valid_loss, acc = train_one_epoch(dls)
    assert train_loss > 0 and valid_loss > 0 and 0 <= acc <= 1  # one real epoch, measured on validation images

    # pandas reads "7" as 7 whatever the quoting; the export says so and names the call that keeps text.
    assert "as numbers" in report.note and TEXT_LABELS_CALL.format(out=out.as_posix()).replace("\n", "; ") in report.note
    scope = {"pd": pd, "ImageDataLoaders": ImageDataLoaders, "Resize": Resize, "SMALL": SMALL}
    exec(TEXT_LABELS_CALL.format(out=out.as_posix()).replace("Resize(224))", "Resize(224), **SMALL)"), scope)
    text_dls = scope["dls"]
    assert list(text_dls.vocab) == list(VOCAB) and all(type(c) is str for c in text_dls.vocab)
    assert len(text_dls.valid_ds) == 10
    readme = (REPO / "README.md").read_text()
    assert 'ImageDataLoaders.from_csv("out", valid_col="is_valid", item_tfms=Resize(224))' in readme
    assert TEXT_LABELS_CALL.format(out="out") in readme


@pytest.mark.filterwarnings("ignore::pandas.errors.ParserWarning")
def test_named_classes_need_no_note(services, sqlite_url, tmp_path):
    _, ImageDataLoaders, _, Resize, _ = fastai()
    svc, _ = reviewed_service(services, sqlite_url, n_per_class=3)
    report = jobs.export_reviewed(svc.store, tmp_path / "out")
    assert report.note is None
    dls = ImageDataLoaders.from_csv(tmp_path / "out", valid_col="is_valid", item_tfms=Resize(224), **SMALL)
    assert list(dls.vocab) == sorted(COLOURS) and len(dls.valid_ds) > 0
