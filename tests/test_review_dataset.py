import csv

import numpy as np
import pytest

from review import jobs
from review.dataset import list_labeled
from review.types import ReviewError
from tests import review_fixtures as rf
from tests.review_fixtures import VOCAB, square

services, sqlite_url = rf.services, rf.sqlite_url  # fixtures

# (folder it is filed under, true colour channel, channel value): the value sets the fake model's confidence
WRONG = [("red", 2, 250), ("green", 0, 190), ("blue", 1, 220)]


def colour(channel, value):
    rgb = [20, 20, 20]
    rgb[channel] = value
    return tuple(rgb)


def fake_predict(images):
    """A perfect colour model: dominant channel, with confidence = that channel's value / 255 (0.6-0.95)."""
    out = []
    for img in images:
        mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        top = int(mean.argmax())
        conf = float(np.clip(mean[top] / 255, 0.6, 0.95))
        p = np.full(3, (1 - conf) / 2)
        p[top] = conf
        out.append(p)
    return np.stack(out).astype(np.float32)


def make_folder(root):
    for c, cls in enumerate(VOCAB):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            square(colour(c, 200), size=20, mark=i + 1).save(root / cls / f"ok{i}.png")
    for k, (folder, channel, value) in enumerate(WRONG):
        square(colour(channel, value), size=20, mark=30 + k).save(root / folder / f"wrong{k}.jpg", quality=95)
    (root / "red" / "notes.png").write_text("not an image")
    return root


def test_folder_import_queues_mislabelled_first(services, sqlite_url, tmp_path):
    svc = services(sqlite_url)
    stats = jobs.import_dataset(svc.store, svc.pipeline(fake_predict), make_folder(tmp_path / "ds"), batch_size=4)
    assert (stats.files, stats.imported, stats.queued, stats.unknown_labels) == (19, 18, 3, {})
    assert len(stats.rejected) == 1 and "text file" in stats.rejected[0][1]
    items = []
    while (item := svc.desk.next_item("alice", reason="dataset")) is not None:
        items.append(item)
        svc.desk.decide("alice", item.item_id, action="relabel", label=item.predicted, idempotency_key=item.image_sha256)
    # exactly the mislabelled ones, highest loss (most confident contradiction) first
    assert [(i.claimed_labels[0], i.predicted) for i in items] == [("red", "blue"), ("blue", "green"),
                                                                   ("green", "red")]
    losses = [i.loss for i in items]
    assert losses == sorted(losses, reverse=True) and losses[-1] > 1.0
    assert all(i.reasons == ("dataset",) and i.source == "dataset" for i in items)
    assert svc.desk.counts()["predictions"] == 18


def test_csv_import_and_unknown_labels(services, sqlite_url, tmp_path):
    root = make_folder(tmp_path / "ds")
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "label", "is_valid"])
        for p in sorted(root.glob("*/*.*")):
            if p.name != "notes.png":
                w.writerow([p.relative_to(root).as_posix(), "purple" if p.name == "ok0.png" else p.parent.name,
                            False])
    svc = services(sqlite_url)
    stats = jobs.import_dataset(svc.store, svc.pipeline(fake_predict), root)  # a folder with labels.csv: the CSV
    # files labelled with a class the model does not have are skipped and counted per label
    assert (stats.files, stats.imported, stats.queued, stats.unknown_labels) == (18, 15, 3, {"purple": 3})


def test_list_labeled_errors(tmp_path):
    with pytest.raises(ReviewError, match="neither"):
        list_labeled(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    square((1, 2, 3)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ReviewError, match="no images in class folders"):
        list_labeled(tmp_path / "flat")
    (tmp_path / "bad.csv").write_text("file,class\na.png,red\n")
    with pytest.raises(ReviewError, match="fname,label"):
        list_labeled(tmp_path / "bad.csv")
