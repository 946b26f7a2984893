"""Batch jobs over the store: dataset audit import, re-scoring by a new model, export, reconcile, purge.

Plain functions taking the ``ReviewStore`` (and, where they predict, the prediction pipeline or a predictor):
the CLI (``python -m review``) and the app call them; a new job is a new function, not an edit to a class.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from review import dataset, export, maintenance, rescore
from review.db import Prediction, QueueEntry
from review.store import ReviewStore
from review.types import ReviewError


def import_dataset(store: ReviewStore, pipeline, source: Path, *, batch_size: int = 32) -> dataset.ImportStats:
    """Score a labelled folder or labels.csv through the prediction pipeline; queue likely label errors."""
    from serving.pipeline import Answer, Input

    files = dataset.list_labeled(source)
    vocab = set(pipeline.router.current.info.vocab)
    result = dataset.ImportStats()
    ids: list[str] = []
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        inputs, kept = [], []
        for lf in chunk:
            result.files += 1
            if lf.label not in vocab:
                result.unknown_labels[lf.label] = result.unknown_labels.get(lf.label, 0) + 1
                continue
            try:
                data = lf.path.read_bytes()
            except OSError as exc:  # missing or unreadable file named by a labels.csv
                result.rejected.append((str(lf.path), exc.strerror or str(exc)))
                continue
            inputs.append(Input(data, "dataset", claimed_label=lf.label))
            kept.append(lf)
        for lf, answer in zip(kept, pipeline.predict(inputs), strict=True):
            if isinstance(answer, Answer):
                ids.append(answer.prediction_id)
            else:
                result.rejected.append((str(lf.path), answer.args[0]))
    store.flush()
    result.imported = len(ids)
    result.queued = store.transaction(lambda s: _queued_for(s, ids), read=True)
    return result


def _queued_for(session, prediction_ids: list[str]) -> int:
    """Open dataset-audit items among the images of these predictions."""
    shas: set[str] = set()
    for i in range(0, len(prediction_ids), 500):
        shas |= set(session.scalars(select(Prediction.image_sha256).where(
            Prediction.id.in_(prediction_ids[i : i + 500]), Prediction.image_sha256.is_not(None))))
    found = 0
    ordered = sorted(shas)
    for i in range(0, len(ordered), 500):
        found += session.scalar(select(func.count()).select_from(QueueEntry).where(
            QueueEntry.image_sha256.in_(ordered[i : i + 500]), QueueEntry.dataset))
    return found


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
