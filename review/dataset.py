"""Labelled datasets: the job of fastai's ``ImageClassifierCleaner``, with every decision remembered.

A labelled image folder (one folder per class, the ``parent_label`` convention; files found recursively, the label
is the file's parent folder) or a ``labels.csv`` (``fname,label``; fname relative to the CSV's folder; extra
columns such as ``is_valid`` are ignored).

This module only lists the labelled files. review.trainset decodes and stores them; review.audit.audit_dataset
scores them out of fold (K fresh models: finds errors in the training set itself) and review.jobs.import_dataset
with the served model (new data only: a model cannot audit labels it was trained on). Both log rows with
``source="dataset"`` and ``claimed_label`` = the dataset's label, in short transactions, and queue the likely label
errors (reason "dataset"). Files whose label is not one of the classes are skipped and listed per label.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from review.types import ReviewError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class LabeledFile:
    path: Path
    label: str


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
