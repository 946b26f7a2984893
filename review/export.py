"""Export reviewed items for retraining with fastai.

Layout of ``out_dir``:
* ``labels.csv`` - ``fname,label,is_valid``; ``ImageDataLoaders.from_csv(out_dir, valid_col='is_valid')`` loads it
  as is (fname is relative to out_dir). ``is_valid`` (see ``valid_split``) comes from a hash of the image sha256, so
  the split is stable across exports, and every class with two images or more has one on each side.
  pandas (hence from_csv) reads a label column whose names all look like numbers as numbers (the digits' "7" becomes
  7) whatever the quoting: the report's ``note`` says so and gives the call that keeps them as text.
* ``images/<sha>.jpg|.png`` or, with ``folders=True``, ``<label>/<sha>.jpg|.png`` (fastai's ``parent_label``
  layout too); the extension is the stored format's (JPEG for photos, PNG for small or few-colour images).
* ``excluded.csv`` - ``image_sha256,reason,reviewers``: out_of_domain, bad_image, second-opinion disagreements
  (neither label is trustworthy) and decided items whose image was purged (image_missing).
* ``decisions.jsonl`` - every decision ever recorded, undos and skips included, oldest first (the audit trail).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from review import scoring
from review.db import Decision, QueueEntry
from review.decisions import not_reversed
from review.imagestore import ImageStore
from review.types import DECISIVE, EXCLUDING, ReviewError


@dataclass(frozen=True)
class ExportReport:
    out_dir: Path
    labelled: int
    valid: int
    excluded: int
    missing_images: int
    decisions: int
    note: str | None = None  # how to load labels that from_csv would not read back as the same text


# What the README documents, for labels pandas would change (numbers, "NA", "True"): keeps each name as text.
TEXT_LABELS_CALL = ('df = pd.read_csv("{out}/labels.csv", dtype={{"label": str}}, keep_default_na=False)\n'
                    'dls = ImageDataLoaders.from_df(df, "{out}", valid_col="is_valid", item_tfms=Resize(224))')


def _safe_folder(label: str) -> str:
    if not label or label in (".", "..") or any(c in label for c in "/\\\0"):
        raise ReviewError(f"class {label!r} cannot be a folder name; export without folders=True")
    return label


def valid_split(shas: Sequence[str], labels: Sequence[str], valid_pct: float) -> np.ndarray:
    """``is_valid`` per image: its content hash is below ``valid_pct``, so an image keeps its side whatever else is
    added; except where that leaves a class without an image on one side. fastai builds the vocab from the training
    side (a validation label it never trained on is an error) and a class without validation images goes unmeasured.
    So in a class of two images or more, if the hash puts none in validation its lowest-hash image goes there, and
    if it puts all there its highest-hash image trains; a class's only image trains. Only such a forced image can
    change side later, once its class has images on both sides by hash alone."""
    if not 0 < valid_pct < 1:
        raise ReviewError(f"valid_pct must be between 0 and 1 (got {valid_pct})")
    h = scoring.unit_hash(shas, "valid:")
    mask = h < valid_pct
    members: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        members[label].append(i)
    for idx in members.values():
        if len(idx) == 1:
            mask[idx[0]] = False
        elif not mask[idx].any():
            mask[min(idx, key=h.__getitem__)] = True
        elif mask[idx].all():
            mask[max(idx, key=h.__getitem__)] = False
    return mask


def labels_note(csv_path: Path, labels: Sequence[str]) -> str | None:
    """None if fastai's from_csv reads the labels back as the very strings written; else what to do instead.

    Reads the file with from_csv's own read_csv arguments rather than guessing pandas' type inference."""
    import warnings

    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "falling back to the 'python' engine" (sep=None, as fastai passes)
        column = pd.read_csv(csv_path, header="infer", delimiter=None, quoting=csv.QUOTE_MINIMAL).iloc[:, 1]
    read = column.tolist()
    if all(isinstance(v, str) for v in read) and read == list(labels):
        return None
    changed = sorted({f"{w!r} as {r!r}" for w, r in zip(labels, read, strict=True) if r != w or type(r) is not str})
    return (f"pandas reads class names as numbers or other types ({', '.join(changed[:3])}, ...), so from_csv's vocab "
            "would not hold the model's class names as text. To keep them as text: "
            + TEXT_LABELS_CALL.format(out=csv_path.parent.as_posix()).replace("\n", "; "))


def export_reviewed(session: Session, store: ImageStore, out_dir: Path, *, folders: bool = False,
                    valid_pct: float = 0.2) -> ExportReport:
    if not 0 < valid_pct < 1:
        raise ReviewError(f"valid_pct must be between 0 and 1 (got {valid_pct})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReviewError(f"{out_dir} is not empty; export into a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    labelled, excluded = reviewed_outcomes(session, store)
    valid_mask = valid_split([sha for sha, _ in labelled], [label for _, label in labelled], valid_pct)
    with open(out_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "label", "is_valid"])
        for (sha, label), is_valid in zip(labelled, valid_mask, strict=True):
            src = store.path(sha)  # <sha>.jpg or <sha>.png: the name keeps the stored format's extension
            rel = Path(_safe_folder(label) if folders else "images") / src.name
            (out_dir / rel.parent).mkdir(exist_ok=True)
            shutil.copyfile(src, out_dir / rel)
            w.writerow([rel.as_posix(), label, bool(is_valid)])  # pandas reads True/False as bool
    with open(out_dir / "excluded.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_sha256", "reason", "reviewers"])
        w.writerows(excluded)
    n_decisions = 0
    with open(out_dir / "decisions.jsonl", "w") as f:
        stmt = (select(Decision, QueueEntry.image_sha256).join(QueueEntry, QueueEntry.id == Decision.item_id)
                .order_by(Decision.id).execution_options(yield_per=1000))
        for d, sha in session.execute(stmt):
            f.write(json.dumps({
                "id": d.id, "item_id": d.item_id, "image_sha256": sha, "reviewer": d.reviewer,
                "time": d.created.isoformat(), "action": d.action, "label": d.label,
                "previous_label": d.previous_label, "model_version": d.model_version,
                "idempotency_key": d.idempotency_key, "reverses_id": d.reverses_id}) + "\n")
            n_decisions += 1
    return ExportReport(out_dir=out_dir, labelled=len(labelled), valid=int(valid_mask.sum()),
                        excluded=len(excluded), missing_images=sum(1 for e in excluded if e[1] == "image_missing"),
                        decisions=n_decisions,
                        note=labels_note(out_dir / "labels.csv", [label for _, label in labelled]) if labelled else None)


def reviewed_outcomes(session: Session, store: ImageStore) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """What reviewers settled: ([(image sha256, label)], [(image sha256, reason, reviewers)] excluded).
    Shared by the export and by retraining (review.trainset)."""
    rows = session.execute(
        select(QueueEntry.image_sha256, Decision.reviewer, Decision.action, Decision.label)
        .join(Decision, Decision.item_id == QueueEntry.id)
        .where(QueueEntry.status == "done", Decision.action.in_(DECISIVE), not_reversed())
        .order_by(QueueEntry.image_sha256, Decision.id)).all()
    per_image: dict[str, list] = {}
    for sha, reviewer, action, label in rows:
        per_image.setdefault(sha, []).append((reviewer, action, label))

    labelled, excluded = [], []
    for sha, decided in per_image.items():
        outcomes = {action if action in EXCLUDING else label for _, action, label in decided}
        reviewers = " ".join(sorted({r for r, _, _ in decided}))
        if len(outcomes) > 1:
            excluded.append((sha, "disagreement", reviewers))
        elif (outcome := outcomes.pop()) in EXCLUDING:
            excluded.append((sha, outcome, reviewers))
        elif not store.exists(sha):
            excluded.append((sha, "image_missing", reviewers))
        else:
            labelled.append((sha, outcome))
    return labelled, excluded
