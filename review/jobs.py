"""Batch jobs over the store: dataset import (served model; the out-of-fold audit is review.audit), re-scoring by a new model, export, reconcile, purge.

Plain functions taking the ``ReviewStore`` (and, where they predict, the prediction pipeline or a predictor):
the CLI (``python -m review``) and the app call them; a new job is a new function, not an edit to a class.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np

from review import export, maintenance, rescore
from review.store import ReviewStore
from review.types import ReviewError


def import_dataset(store: ReviewStore, pipeline, source: Path, *, batch_size: int = 32,
                   method: str | None = None, queue: str = "flagged", progress: bool = False):
    """Score a labelled folder or labels.csv with the SERVED model, through the prediction pipeline; queue likely
    label errors (review.audit's scores and rule). Good for auditing NEW data; blind to labels the model was
    trained on (it has learnt them, right or wrong): use review.audit.audit_dataset for the training set.
    Returns a review.audit.AuditReport; ``trained_on`` counts imported images the served model was trained on
    (known when Loupe trained it: the registry keeps its training images), None when unknown."""
    from model import versions
    from model.progress import Progress
    from review import audit, trainset
    from serving.pipeline import Answer, Input

    info = pipeline.router.routes().current.info
    reading = Progress(0, "reading", enabled=progress)
    base, loaded = trainset.load_base(source, store.images, max_bytes=pipeline.max_bytes,
                                      max_pixels=pipeline.max_pixels, vocab=set(info.vocab), progress=reading)
    reading.close(f"{loaded.images:,} images")
    report = audit.AuditReport(str(source), info.version, files=loaded.files, images=len(base),
                               unknown_labels=loaded.unknown_labels, rejected=loaded.rejected,
                               duplicates=loaded.duplicates, conflicts=loaded.conflicts,
                               method=method or audit.DEFAULT_METHOD, review_at=audit.review_address(store.settings))

    def overlap(session):
        rec = versions.by_sha256(session, info.sha256)
        return None if rec is None else len(versions.trained_on(session, rec.version, [b.sha256 for b in base]))

    report.trained_on = store.transaction(overlap, read=True)
    done = audit.already_logged(store, info.version, base)
    todo = [b for b in base if (b.sha256, b.label) not in done]
    report.already = len(base) - len(todo)
    scoring_bar = Progress(len(todo), "scoring", enabled=progress)
    kept, rows = [], []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        # The stored PNG is what serving decoded: the pipeline re-decodes it losslessly, under the same limits.
        inputs = [Input(store.images.read(b.sha256), "dataset", claimed_label=b.label, log=False) for b in chunk]
        for b, answer in zip(chunk, pipeline.predict(inputs), strict=True):
            if isinstance(answer, Answer) and answer.model.version == info.version:
                kept.append(b)
                rows.append(answer.probs)
            else:
                report.rejected.append((b.origin, answer.args[0] if answer is not None else "no answer"))
        scoring_bar.update(len(chunk))
    report.images_per_s = scoring_bar.close()
    if kept:
        probs = np.stack(rows)
        quality, issues = audit.label_scores(kept, info.vocab, probs, report.method)
        report.queued = audit.queue_records(store, info, kept, probs, quality, issues, queue=queue)
        report.imported, report.flagged = len(kept), int(issues.sum())
        report.disagreement = audit.disagreement(kept, info.vocab, probs)
    return report


def rescore_labelled(store: ReviewStore, predictor, *, batch_size: int = 32) -> dict:
    """Score every labelled image this model version has not scored yet, where its classes match the label's."""
    info = predictor.info
    todo = store.transaction(lambda s: rescore.labelled_images(s, info.version, info.vocab), read=True)
    done = {"scored": 0, "queued": 0, "missing_images": 0}
    for i in range(0, len(todo), batch_size):
        recs, missing = rescore.rescore_records(todo[i : i + batch_size], store.images, predictor.predict_probs,
                                                info, store.clock())
        done["missing_images"] += missing
        done["scored"] += len(recs)
        done["queued"] += store.write_now(recs, replace_prediction=True)
    return done


def export_reviewed(store: ReviewStore, out_dir: Path, *, folders: bool = False,
                    valid_pct: float = 0.2) -> export.ExportReport:
    return store.transaction(lambda s: export.export_reviewed(s, store.images, out_dir, folders=folders,
                                                              valid_pct=valid_pct), read=True)


def reconcile(store: ReviewStore, *, fix: bool = False, grace_s: float = 3600.0) -> maintenance.ReconcileReport:
    return store.transaction(lambda s: maintenance.reconcile(s, store.images, fix=fix, grace_s=grace_s))


def purge(store: ReviewStore, *, days: float | None = None, dry_run: bool = False) -> maintenance.PurgeReport:
    days = days if days is not None else store.settings.retention_days
    if days is None:
        raise ReviewError("no retention period: set LOUPE_RETENTION_DAYS or pass --days")
    cutoff = store.clock() - timedelta(days=days)
    report = store.transaction(lambda s: maintenance.purge(s, cutoff=cutoff, dry_run=dry_run))
    if not dry_run:  # after the commit: a crash here leaves orphan files (reconcile), never dangling rows
        for sha in report.images:
            store.images.delete(sha)
    return report
