"""What a model trains on: the base dataset, with what reviewers and users settled applied to it.

The base dataset is the demo's digits (rendered as model.demo does), a labelled folder or a labels.csv
(review.dataset). Every image is decoded the way serving decodes uploads (serving.imageio: size limits, EXIF
orientation, mode conversion) and kept as a lossless PNG in a content-addressed store (review.imagestore), so the
sha256 that names it is the one the prediction log and the review queue use, and the model trains on the pixels
it will be served.

On top of the base (``assemble``):
* a reviewer's decision on an image wins over the dataset's label (relabels applied; confirmations kept);
* out-of-domain and bad images, and images two reviewers disagreed on, are dropped (review.export's rules);
* reviewer-settled traffic (uploads, webcam, API...) is added, and so is traffic a user confirmed ("this is
  right") that no reviewer has settled.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from model.train import Item
from review import dataset, export
from review.db import Decision, Prediction
from review.imagestore import ImageStore
from review.types import ReviewError
from serving.imageio import ImageRejected, decode_image, encode_for_storage, image_stats

# Where a training label comes from.
SOURCES = ("dataset", "dataset-reviewed", "reviewed", "user-confirmed")
TRAFFIC = ("upload", "webcam", "sketch", "stream", "api")


@dataclass(frozen=True)
class BaseImage:
    sha256: str
    label: str
    origin: str  # the file it came from ("demo:<index>" for the demo digits)
    stats: dict = field(default_factory=dict)  # serving.imageio.image_stats (width, height, brightness)
    size_bytes: int = 0  # of the stored PNG


@dataclass
class BaseReport:
    source: str
    files: int = 0
    images: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    duplicates: int = 0  # the same content and label listed again: used once
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)  # (file, its label, the label kept)
    unknown_labels: dict[str, int] = field(default_factory=dict)  # label outside the vocab -> files skipped
    sha256: str = ""  # of the sorted (image sha256, label) list: names this exact dataset

    def describe(self) -> dict:
        return {"source": self.source, "files": self.files, "images": self.images, "rejected": len(self.rejected),
                "duplicates": self.duplicates, "conflicts": len(self.conflicts),
                "unknown_labels": self.unknown_labels, "sha256": self.sha256}


def load_base(source: str | Path, images: ImageStore, *, max_bytes: int, max_pixels: int,
              vocab: set[str] | None = None, demo_size: int = 32,
              progress=None) -> tuple[list[BaseImage], BaseReport]:
    """Decode and store the base dataset; ``vocab``: labels outside it are skipped and counted per label.
    ``source`` is "demo", a folder of class folders, or a labels.csv. ``progress``: a model.progress.Progress."""
    report = BaseReport(str(source))
    by_sha: dict[str, BaseImage] = {}
    listing = list(_listing(source, demo_size))
    if progress is not None:
        progress.total = len(listing)
    for origin, label, load in listing:
        report.files += 1
        if progress is not None:
            progress.update(1)
        if vocab is not None and label not in vocab:
            report.unknown_labels[label] = report.unknown_labels.get(label, 0) + 1
            continue
        try:
            img = load(max_bytes, max_pixels)
        except ImageRejected as exc:
            report.rejected.append((origin, exc.args[0]))
            continue
        except OSError as exc:  # a labels.csv naming a missing or unreadable file
            report.rejected.append((origin, exc.strerror or str(exc)))
            continue
        png = encode_for_storage(img)
        sha = images.put_bytes(png)
        kept = by_sha.get(sha)
        if kept is None:
            by_sha[sha] = BaseImage(sha, label, origin, image_stats(img), len(png))
        elif kept.label == label:
            report.duplicates += 1
        else:
            report.conflicts.append((origin, label, kept.label))
    out = list(by_sha.values())
    report.images = len(out)
    report.sha256 = hashlib.sha256(json.dumps(sorted((b.sha256, b.label) for b in out)).encode()).hexdigest()
    return out, report


def _listing(source: str | Path, demo_size: int):
    """(origin, label, loader(max_bytes, max_pixels) -> RGB image) per listed file."""
    if str(source) == "demo":
        from sklearn.datasets import load_digits

        from model.demo import render

        digits = load_digits()
        for i, (values, target) in enumerate(zip(digits.data, digits.target, strict=True)):
            yield f"demo:{i}", str(int(target)), (lambda _b, _p, v=values: render(v, demo_size))
        return
    for lf in dataset.list_labeled(Path(source)):
        yield str(lf.path), lf.label, (lambda b, p, path=lf.path: decode_image(path.read_bytes(), max_bytes=b,
                                                                               max_pixels=p))


@dataclass
class TrainingData:
    items: list[Item]
    vocab: tuple[str, ...]
    snapshot: dict  # recorded with the version (counts per class and source, base dataset, decisions used)


def reviewed(session: Session, images: ImageStore) -> dict:
    """Everything people settled, read in one transaction (a consistent snapshot)."""
    labelled, excluded = export.reviewed_outcomes(session, images)
    settled = {sha for sha, _ in labelled} | {sha for sha, _, _ in excluded}
    confirmed: dict[str, str] = {}
    rows = session.execute(
        select(Prediction.image_sha256, Prediction.claimed_label)
        .where(Prediction.feedback_correct.is_(True), text("predictions.claimed_label IS NOT NULL"),
               Prediction.image_sha256.is_not(None), Prediction.source.in_(TRAFFIC))
        .order_by(Prediction.created, Prediction.id)).all()
    for sha, label in rows:  # the latest confirmation counts
        if sha not in settled and images.exists(sha):
            confirmed[sha] = label
    last_decision = session.scalar(select(func.max(Decision.id)))
    return {"labelled": dict(labelled), "excluded": {sha: reason for sha, reason, _ in excluded},
            "confirmed": confirmed, "last_decision_id": last_decision}


def assemble(base: list[BaseImage], base_report: BaseReport | None, base_images: ImageStore, people: dict,
             store_images: ImageStore, *, parent_vocab: tuple[str, ...] | None = None) -> TrainingData:
    """Base + people's labels -> training items, vocab (the parent's order, new classes appended sorted)."""
    items: list[Item] = []
    dropped: Counter = Counter()
    relabelled = 0
    in_base = set()
    for b in base:
        in_base.add(b.sha256)
        if b.sha256 in people["excluded"]:
            dropped[people["excluded"][b.sha256]] += 1
            continue
        label = people["labelled"].get(b.sha256)
        if label is None:
            items.append(Item(base_images.path(b.sha256), b.label, b.sha256, "dataset"))
        else:
            relabelled += label != b.label
            items.append(Item(base_images.path(b.sha256), label, b.sha256, "dataset-reviewed"))
    for sha, label in people["labelled"].items():
        if sha not in in_base:
            items.append(Item(store_images.path(sha), label, sha, "reviewed"))
    for sha, label in people["confirmed"].items():
        if sha not in in_base:
            items.append(Item(store_images.path(sha), label, sha, "user-confirmed"))
    if not items:
        raise ReviewError("nothing to train on: the base dataset is empty and nothing has been reviewed")
    labels = sorted({it.label for it in items})
    vocab = tuple(parent_vocab or ()) + tuple(c for c in labels if c not in (parent_vocab or ()))
    by_class = Counter(it.label for it in items)
    by_source = Counter(it.source for it in items)
    by_class_source: dict[str, dict[str, int]] = {}
    for it in items:
        by_class_source.setdefault(it.label, Counter())[it.source] += 1
    snapshot = {
        "base": base_report.describe() if base_report else None,
        "counts": {"total": len(items), "by_class": {c: by_class.get(c, 0) for c in vocab},
                   "by_source": {s: by_source.get(s, 0) for s in SOURCES},
                   "by_class_source": {c: dict(v) for c, v in sorted(by_class_source.items())}},
        "relabelled": relabelled,
        "dropped": dict(dropped),  # base images reviewers excluded, by reason
        "excluded_by_reviewers": dict(Counter(people["excluded"].values())),
        "reviewed_up_to_decision": people["last_decision_id"],
    }
    return TrainingData(items, vocab, snapshot)
