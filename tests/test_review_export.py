
import csv
import json
import warnings

import pytest

from review import jobs
from review.types import ReviewError
from tests import review_fixtures as rf
from tests.review_fixtures import probs, square, upload

services, sqlite_url = rf.services, rf.sqlite_url  # fixtures

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


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


@pytest.mark.filterwarnings("ignore::pandas.errors.ParserWarning")  # fastai's own read_csv(delimiter=None)
def test_export_trains_a_fastai_learner(services, sqlite_url, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's import-time FutureWarnings
        from fastai.vision.all import CrossEntropyLossFlat, ImageDataLoaders, Learner, Resize, accuracy
    from torch import nn
    svc, _ = reviewed_service(services, sqlite_url)
    out = tmp_path / "export"
    jobs.export_reviewed(svc.store, out, valid_pct=0.3)
    dls = ImageDataLoaders.from_csv(out, valid_col="is_valid", item_tfms=Resize(32), bs=8, num_workers=0)
    assert set(dls.vocab) == set(COLOURS)
    assert len(dls.train_ds) + len(dls.valid_ds) == 23 and len(dls.valid_ds) > 0
    tiny = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, len(dls.vocab)))
    learn = Learner(dls, tiny, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    assert train_loss > 0 and valid_loss > 0 and 0 <= acc <= 1  # one real epoch over the exported images
