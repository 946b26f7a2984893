"""Export reviewed items for retraining with fastai.

Layout of ``out_dir``:
* ``labels.csv`` - ``fname,label,is_valid``; ``ImageDataLoaders.from_csv(out_dir, valid_col='is_valid')`` loads it
  as is (fname is relative to out_dir). ``is_valid`` is a hash of the image sha256, so the split is stable
  across exports: an image never moves from valid to train when more reviews arrive.
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
from dataclasses import dataclass
from pathlib import Path

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


def _safe_folder(label: str) -> str:
    if not label or label in (".", "..") or any(c in label for c in "/\\\0"):
        raise ReviewError(f"class {label!r} cannot be a folder name; export without folders=True")
    return label


def export_reviewed(session: Session, store: ImageStore, out_dir: Path, *, folders: bool = False,
                    valid_pct: float = 0.2) -> ExportReport:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReviewError(f"{out_dir} is not empty; export into a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    labelled, excluded = reviewed_outcomes(session, store)
    valid_mask = scoring.unit_hash([sha for sha, _ in labelled], "valid:") < valid_pct
    with open(out_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "label", "is_valid"])
        for (sha, label), is_valid in zip(labelled, valid_mask, strict=True):
            src = store.path(sha)  # <sha>.jpg or <sha>.png: the name keeps the stored format's extension
            rel = Path(_safe_folder(label) if folders else "images") / src.name
            (out_dir / rel.parent).mkdir(exist_ok=True)
            shutil.copyfile(src, out_dir / rel)
            w.writerow([rel.as_posix(), label, bool(is_valid)])
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
                        decisions=n_decisions)


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
