"""Dataset audit: the job of fastai's ``ImageClassifierCleaner``, with every decision remembered.

Import a labelled image folder (one folder per class, the ``parent_label`` convention; files found recursively,
the label is the file's parent folder) or a ``labels.csv`` (``fname,label``; fname relative to the CSV's folder;
extra columns such as ``is_valid`` are ignored). Each image is scored by the model; rows are stored with
``source="dataset"`` and ``claimed_label`` = the dataset's label, and every image whose label has a loss above
``settings.high_loss`` is queued (reason "dataset"), highest loss first.

Nothing here touches the database: the caller scores a chunk, then writes it with ``review.ingest`` in its own
short transaction, so a long import never holds the SQLite write lock while the model runs.
"""

from __future__ import annotations

import csv
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from model.imageio import ImageRejected, decode_image, image_stats
from review.ingest import PredictionRecord
from review.types import ReviewError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
PredictFn = Callable[[Sequence[Image.Image]], np.ndarray]


@dataclass(frozen=True)
class LabeledFile:
    path: Path
    label: str


@dataclass
class ImportStats:
    files: int = 0
    imported: int = 0
    queued: int = 0
    unknown_label: int = 0  # label not in the model's vocab: stored, loss unknown, not queued
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def list_labeled(source: Path) -> list[LabeledFile]:
    source = Path(source)
    if source.is_file():
        return _from_csv(source)
    if (source / "labels.csv").is_file():
        return _from_csv(source / "labels.csv")
    if not source.is_dir():
        raise ReviewError(f"{source} is neither a folder of class folders nor a labels.csv file")
    files = sorted(p for p in source.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.parent != source and p.is_file())
    if not files:
        raise ReviewError(f"no images in class folders under {source} (expected {source}/<class>/<image>)")
    return [LabeledFile(p, p.parent.name) for p in files]


def _from_csv(path: Path) -> list[LabeledFile]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"fname", "label"} <= set(reader.fieldnames):
            raise ReviewError(f"{path} needs a header with the columns fname,label (found {reader.fieldnames})")
        rows = [(r["fname"], r["label"]) for r in reader]
    return [LabeledFile(path.parent / fname, label) for fname, label in rows]


def score_files(files: Sequence[LabeledFile], predict_probs: PredictFn, model_info, *, max_bytes: int,
                max_pixels: int, now: datetime, stats: ImportStats) -> list[PredictionRecord]:
    """Decode and score one chunk; unreadable files go to ``stats.rejected`` with the reason."""
    images, blobs, kept = [], [], []
    for lf in files:
        stats.files += 1
        try:
            data = lf.path.read_bytes()
            img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
        except ImageRejected as exc:
            stats.rejected.append((str(lf.path), exc.args[0]))
            continue
        except OSError as exc:  # missing or unreadable file named by a labels.csv
            stats.rejected.append((str(lf.path), str(exc)))
            continue
        images.append(img)
        blobs.append(data)  # what is stored: the writer shrinks and re-encodes it like an upload
        kept.append(lf)
    if not kept:
        return []
    t0 = time.perf_counter()
    probs = np.asarray(predict_probs(images))
    per_image_ms = (time.perf_counter() - t0) * 1000 / len(kept)
    vocab = tuple(model_info.vocab)
    if probs.shape != (len(kept), len(vocab)):
        raise ValueError(f"predict_probs returned shape {probs.shape}, expected {(len(kept), len(vocab))}")
    records = []
    for lf, img, data, p in zip(kept, images, blobs, probs, strict=True):
        stats.unknown_label += lf.label not in vocab
        records.append(PredictionRecord(id=uuid.uuid4().hex, created=now, source="dataset",
                                        model_version=model_info.version, vocab=vocab, probs=p,
                                        latency_ms=per_image_ms, data=data, stats=image_stats(img),
                                        claimed_label=lf.label))
    stats.imported += len(records)
    return records
