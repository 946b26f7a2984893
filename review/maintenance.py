"""Reconcile image files with rows, and purge old traffic (retention).

Purge policy: predictions older than the cutoff are deleted (dataset imports are not traffic and are kept), and
so are the image rows and files no remaining prediction refers to. Open queue items whose image is gone are
closed with status "purged". Decisions are kept (the append-only audit log; they hold labels and reviewer
names, no pixels), and so are decided items; their images are gone, so the export lists them as image_missing.
File deletion happens AFTER the commit (the caller deletes ``PurgeReport.images``): a crash in between leaves
orphan files, which reconcile removes, never a row without its file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from review.db import Prediction, QueueEntry, ShadowPrediction, StoredImage
from review.imagestore import ImageStore

_CHUNK = 500  # keeps IN (...) lists well under SQLite's and PostgreSQL's parameter limits


def _chunks(seq: Sequence, n: int = _CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


@dataclass
class ReconcileReport:
    orphan_files: list[str] = field(default_factory=list)  # files without a row (older than the grace period)
    missing_files: list[str] = field(default_factory=list)  # rows without a file
    temp_files: list[str] = field(default_factory=list)  # leftovers of interrupted writes
    young_orphans: int = 0  # newer than the grace period: probably a row on its way, left alone
    fixed: bool = False

    @property
    def clean(self) -> bool:
        return not (self.orphan_files or self.missing_files or self.temp_files)


def reconcile(session: Session, store: ImageStore, *, fix: bool = False, grace_s: float = 3600.0) -> ReconcileReport:
    """Compare the image table with the store; with ``fix``, delete orphans and forget rows whose file is lost.

    Rows are listed before files and files are written before rows, so a write racing this check can only
    look like a young orphan, which the grace period leaves alone.
    """
    rows = set(session.scalars(select(StoredImage.sha256)))
    files = set(store.iter_shas())
    limit = time.time() - grace_s
    report = ReconcileReport(missing_files=sorted(rows - files))
    for sha in sorted(files - rows):
        if store.path(sha).stat().st_mtime < limit:
            report.orphan_files.append(sha)
        else:
            report.young_orphans += 1
    report.temp_files = [str(p) for p in store.iter_temp_files() if p.stat().st_mtime < limit]
    if fix:
        forget_images(session, report.missing_files)
        for sha in report.orphan_files:
            store.delete(sha)
        for tmp in report.temp_files:
            Path(tmp).unlink(missing_ok=True)
        report.fixed = True
    return report


def forget_images(session: Session, shas: Sequence[str]) -> None:
    """Drop image rows; their predictions stay (without image) and their open items close as purged."""
    for chunk in _chunks(list(shas)):
        session.execute(update(Prediction).where(Prediction.image_sha256.in_(chunk)).values(image_sha256=None))
        session.execute(update(QueueEntry).where(QueueEntry.image_sha256.in_(chunk), QueueEntry.status == "open")
                        .values(status="purged", claimed_by=None, lease_until=None))
        session.execute(delete(StoredImage).where(StoredImage.sha256.in_(chunk)))


@dataclass
class PurgeReport:
    cutoff: datetime
    predictions: int = 0
    images: list[str] = field(default_factory=list)  # delete these files after the transaction commits
    items_closed: int = 0
    shadow_predictions: int = 0  # a candidate's answers to the purged traffic (rollout; no image, but traffic)


def purge(session: Session, *, cutoff: datetime, dry_run: bool = False) -> PurgeReport:
    old = (Prediction.created < cutoff, Prediction.source != "dataset")
    report = PurgeReport(cutoff=cutoff)
    affected = list(session.scalars(select(Prediction.image_sha256).where(*old, Prediction.image_sha256.is_not(None))
                                    .distinct()))
    report.predictions = session.scalar(select(func.count()).select_from(Prediction).where(*old))
    old_shadow = ShadowPrediction.created < cutoff  # only live traffic is shadowed: no dataset rows to keep
    report.shadow_predictions = session.scalar(select(func.count()).select_from(ShadowPrediction).where(old_shadow))
    if dry_run:
        kept = {sha for chunk in _chunks(affected) for sha in session.scalars(
            select(Prediction.image_sha256).where(Prediction.image_sha256.in_(chunk), ~(old[0] & old[1])))}
        report.images = sorted(set(affected) - kept)
        return report
    # queue_items.prediction_id is ON DELETE SET NULL: items keep existing, pointing at nothing for a moment
    session.execute(delete(Prediction).where(*old))
    session.execute(delete(ShadowPrediction).where(old_shadow))
    kept = set()
    for chunk in _chunks(affected):
        kept |= set(session.scalars(select(Prediction.image_sha256).where(Prediction.image_sha256.in_(chunk))))
    gone = sorted(set(affected) - kept)
    for chunk in _chunks(gone):
        report.items_closed += session.execute(
            update(QueueEntry).where(QueueEntry.image_sha256.in_(chunk), QueueEntry.status == "open")
            .values(status="purged", claimed_by=None, lease_until=None)).rowcount
        session.execute(delete(StoredImage).where(StoredImage.sha256.in_(chunk)))
    # images still seen by newer predictions: open items show the newest one instead
    for entry in session.scalars(select(QueueEntry).where(QueueEntry.status == "open",
                                                          QueueEntry.prediction_id.is_(None))):
        newest = session.scalar(select(Prediction.id).where(Prediction.image_sha256 == entry.image_sha256)
                                .order_by(Prediction.created.desc()).limit(1))
        entry.prediction_id = newest
    report.images = gone
    return report
