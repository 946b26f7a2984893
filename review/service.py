"""``ReviewService``: the facade the UI, the REST API and the CLI use. It owns engines and transactions.

Authentication is the caller's job: every reviewer-side method takes a reviewer name the caller has already
authenticated (review.auth), and ``image_bytes`` must only be served to such a caller.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from review import dataset, decisions, export, ingest, maintenance, queue, rescore, stats
from review.db import Model, Prediction, StoredImage, create_all, make_engine, utcnow
from review.imagestore import GB, ImageStore, StorageGuard, check_sha
from review.spool import Orphan, Spool, claim_orphans
from review.types import SOURCES, DecisionResult, QueueItem, ReviewError, UnknownPrediction
from review.writer import BackgroundWriter

log = logging.getLogger(__name__)
_RETRY_SQLSTATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock detected
MB = 1 << 20
DROP_REPORT_S = 300.0  # /healthz reports dropped log records for this long after the latest drop


class ReviewService:
    def __init__(self, settings, model_info, *, clock: Callable[[], datetime] = utcnow):
        self.settings = settings
        self.model_info = model_info
        # model_info=None: maintenance only (CLI export/reconcile/purge); logging needs a model
        self.vocab: tuple[str, ...] = tuple(model_info.vocab) if model_info is not None else ()
        self._clock = clock
        self._th = ingest.Thresholds.from_settings(settings)
        self.store = ImageStore(settings.images_dir, max_side=settings.store_max_side,
                                max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        self.engine = make_engine(settings.db_url)
        sqlite_db = self.engine.dialect.name == "sqlite"
        self.read_engine = make_engine(settings.db_url, deferred=True) if sqlite_db else self.engine
        # SQLite has one writer at a time anyway. Threads of this process queue on a lock (woken at once) instead
        # of in SQLite's busy handler, which polls with sleeps of up to 100 ms. Other processes still use that.
        self._write_lock = threading.Lock() if sqlite_db else contextlib.nullcontext()
        create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        if model_info is not None:
            self._register_model()
        self._guard = StorageGuard(
            self.store.root, used=self._stored_bytes, min_free_bytes=int(settings.min_free_disk_gb * GB),
            max_bytes=int(settings.max_storage_gb * GB) or None)
        self._store_error: str | None = None  # why image files cannot be written, until one is (health)
        # Only a service that logs (the app) owns a spool, and replays those of dead processes (even with the spool
        # now switched off); the CLI's maintenance service leaves spools alone.
        spool_dir = settings.data_dir / "spool"
        self._spool = Spool(spool_dir) if model_info is not None and settings.log_spool else None
        orphans = claim_orphans(spool_dir) if model_info is not None else []
        self._writer = BackgroundWriter(self._write_batch, maxsize=settings.log_queue_size,
                                        max_bytes=int(settings.log_queue_mb * MB), block_s=settings.log_block_s,
                                        spool=self._spool, replay=self._replay(orphans))
        self._closed = False
        atexit.register(self.close)  # a clean interpreter exit drains the log even if main() forgot to

    @classmethod
    def build(cls, settings, model_info, *, clock: Callable[[], datetime] | None = None) -> ReviewService:
        return cls(settings, model_info, clock=clock or utcnow)

    # --- transactions ---------------------------------------------------------------------------------------
    def transaction(self, fn: Callable[[Session], object], *, read: bool = False, durable: bool = False,
                    attempts: int = 4):
        """Run ``fn(session)`` in one transaction; retry what a concurrent writer can cause (see below).

        ``durable``: on SQLite, fsync at commit (survives a power cut, not only a crash); see review.db.
        """
        factory = self._read_sessions if read else self._sessions
        lock = self._write_lock if not read else contextlib.nullcontext()
        for attempt in range(attempts):
            try:
                with lock, factory.begin() as session:
                    if durable:
                        session.connection(execution_options={"durable": True})
                    return fn(session)
            except IntegrityError:
                # A racing duplicate (same idempotency key, same undo target, same image) lost on a UNIQUE
                # constraint; the retry sees the winner's row and answers from it.
                if attempt == attempts - 1:
                    raise
            except OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _RETRY_SQLSTATES or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _register_model(self) -> None:
        info = self.model_info
        row = {"version": info.version, "name": info.name, "sha256": info.sha256, "vocab": list(self.vocab),
               "first_seen": self._clock()}

        def fn(session: Session) -> None:
            ins = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
            session.execute(ins(Model).on_conflict_do_nothing(index_elements=["version"]), [row])

        self.transaction(fn)

    # --- end-user side ----------------------------------------------------------------------------------------
    def log_prediction(self, *, data: bytes, stats: dict, probs: np.ndarray, source: str, latency_ms: float,
                       claimed_label: str | None = None) -> str:
        """Queue a prediction for the background writer and return its id at once (see review.writer).

        ``data``: the upload's encoded bytes as received (at most settings.max_upload_bytes; the writer decodes,
        shrinks and stores them in the background). ``stats``: what the caller knows of the decoded image, at
        least its (EXIF-rotated) width and height: ``image_stats(img, brightness=False)`` costs nothing; a
        missing brightness is measured by the writer. The record is in the spool when this returns: the id
        survives a kill -9 (see review.spool).
        """
        if self.model_info is None:
            raise ReviewError("this ReviewService was built without a model; it cannot log predictions")
        if source not in SOURCES:
            raise ReviewError(f"unknown source {source!r}")
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        if probs.shape != (len(self.vocab),):
            raise ReviewError(f"probs has {probs.size} values; the model has {len(self.vocab)} classes")
        self._check_label(claimed_label)
        # Storing off, or the store full: the upload stays in memory only until the writer has measured it.
        keep = self.settings.store_uploads and self._guard.full is None
        pid = uuid.uuid4().hex
        rec = ingest.PredictionRecord(id=pid, created=self._clock(), source=source,
                                      model_version=self.model_info.version, vocab=self.vocab, probs=probs,
                                      latency_ms=float(latency_ms) if math.isfinite(latency_ms) else 0.0,
                                      data=data, claimed_label=claimed_label, keep_image=keep, stats=stats)
        self._writer.submit(rec, key=pid, size=len(data))
        return pid

    def record_feedback(self, prediction_id: str, *, correct: bool | None, claimed_label: str | None) -> None:
        """End-user feedback; ``claimed_label`` (if given) is the label, ``correct`` is stored as given."""
        if correct is None and claimed_label is None:
            raise ReviewError("nothing to record: say whether the prediction is right, or give the right answer")
        self._check_label(claimed_label)
        if not self._writer.is_pending(prediction_id) and not self.transaction(
                lambda s: s.get(Prediction, prediction_id) is not None, read=True):
            raise UnknownPrediction("unknown prediction id (or it was not stored)")
        self._writer.submit(ingest.FeedbackRecord(prediction_id, correct, claimed_label))

    def _check_label(self, label: str | None) -> None:
        if label is not None and label not in self.vocab:
            raise ReviewError(f"{label!r} is not one of the model's classes")

    def _write_batch(self, records: list) -> None:
        preds = [r for r in records if isinstance(r, ingest.PredictionRecord)]
        if replayed := [r.id for r in preds if r.replayed]:  # committed before the crash, spool not yet emptied
            have = set(self.transaction(lambda s: list(s.scalars(select(Prediction.id).where(
                Prediction.id.in_(replayed)))), read=True))
            preds = [r for r in preds if r.id not in have]
        # Checked for every batch with an image, and for every batch while full (records then carry no image,
        # so this is how the store notices that space was freed: a purge, a raised limit).
        refuse = (any(r.data is not None for r in preds) or self._guard.full is not None) and \
            self._guard.check() is not None
        stored = ingest.store_images(preds, self.store, refuse=refuse)  # files first: no row without its file
        self._image_outcome(stored)
        rows, queued = ingest.prediction_rows(preds, self._th)

        def fn(session: Session) -> None:
            ingest.insert_rows(session, stored.rows, rows, queued)
            ingest.apply_feedback(session, [r for r in records if isinstance(r, ingest.FeedbackRecord)], self._th)

        self.transaction(fn)

    def _image_outcome(self, stored: ingest.StoreOutcome) -> None:
        """Track whether image files can be written; say so once when that changes (not once per record)."""
        if stored.error is not None:
            if self._store_error is None:
                log.error("cannot write images to %s (%s): predictions are logged without their images until this "
                          "is fixed", self.store.root, stored.error)
            self._store_error = f"{type(stored.error).__name__}: {stored.error}"
        elif stored.stored and self._store_error is not None:
            log.warning("images are written to %s again", self.store.root)
            self._store_error = None
        for row in stored.rows:
            self._guard.added(row["size_bytes"])

    def _stored_bytes(self) -> int:
        return int(self.transaction(lambda s: s.scalar(select(func.coalesce(func.sum(StoredImage.size_bytes), 0))),
                                    read=True))

    def _replay(self, orphans: list[Orphan]) -> Iterator[list]:
        """Records of dead processes' spools, in batches; each spool is removed once all its batches are written."""
        vocabs: dict[str, tuple[str, ...] | None] = {}

        def vocab(version: str) -> tuple[str, ...] | None:
            if version not in vocabs:
                found = self.transaction(lambda s: s.scalar(select(Model.vocab).where(Model.version == version)),
                                         read=True)
                vocabs[version] = tuple(found) if found is not None else None
            return vocabs[version]

        for orphan in orphans:
            batch, n = [], 0
            for meta, data in orphan.records():
                v = vocab(meta["model_version"]) if meta["kind"] == "prediction" else ()
                if v is None:
                    log.error("spool %s: prediction %s of unknown model %s skipped", orphan.dir, meta["id"],
                              meta["model_version"])
                    continue
                batch.append(ingest.from_spool(meta, data, v))
                n += 1
                if len(batch) >= 16:
                    yield batch
                    batch = []
            if batch:
                yield batch
            log.info("replayed %d records from the spool of a process that did not shut down cleanly (%s)", n,
                     orphan.dir.name)
            orphan.remove()

    def health(self) -> dict:
        """``{"status": "ok"}``, or ``{"status": "degraded", "problems": [...]}`` when predictions are answered but
        not (fully) logged. Cheap (no database, no locks held for long): /healthz calls it on the event loop."""
        problems = []
        if self.model_info is not None and not self._writer.alive:
            problems.append("the prediction log writer has stopped: predictions are not logged")
        if self._writer.db_error:
            problems.append(f"database unavailable, the prediction log is retrying: {self._writer.db_error}")
        if self._store_error:
            problems.append(f"images cannot be written to {self.store.root} ({self._store_error}): predictions are "
                            "logged without their images")
        if self._guard.full:
            problems.append(f"image storage full: {self._guard.full}; new images are not stored")
        if self._spool is not None and self._spool.error:
            problems.append(f"the prediction spool cannot be written ({self._spool.error}): predictions not yet in "
                            "the database would be lost in a crash")
        last_drop = self._writer.last_drop
        if last_drop is not None and time.monotonic() - last_drop < DROP_REPORT_S:
            problems.append(f"prediction log queue full: {self._writer.dropped} records dropped so far, the latest "
                            f"{time.monotonic() - last_drop:.0f} s ago")
        return {"status": "degraded", "problems": problems} if problems else {"status": "ok"}

    def flush(self) -> None:
        """Wait until every prediction logged so far is in the database (tests, CLI, shutdown)."""
        self._writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        if self._spool is not None:
            self._spool.close()  # removed if everything reached the database, else kept for the next start
        self.engine.dispose()
        self.read_engine.dispose()
        atexit.unregister(self.close)

    # --- reviewer side ---------------------------------------------------------------------------------------
    def next_item(self, reviewer: str, *, reason: str | None = None, predicted: str | None = None,
                  model_version: str | None = None) -> QueueItem | None:
        _check_reviewer(reviewer)

        def fn(session: Session) -> QueueItem | None:
            entry = queue.claim_next(session, reviewer, now=self._clock(), lease_s=self.settings.claim_lease_s,
                                     reason=reason, predicted=predicted, model_version=model_version)
            return None if entry is None else queue.to_view(session, entry)

        return self.transaction(fn)

    def release(self, reviewer: str) -> int:
        """Give back the reviewer's claim (logout, tab closed)."""
        return self.transaction(lambda s: queue.release(s, reviewer))

    def decide(self, reviewer: str, item_id: int, *, action: str, label: str | None,
               idempotency_key: str) -> DecisionResult:
        _check_reviewer(reviewer)
        return self.transaction(lambda s: decisions.decide(s, reviewer=reviewer, item_id=item_id, action=action,
                                                           label=label, key=idempotency_key, now=self._clock()),
                                durable=True)

    def undo(self, reviewer: str, *, idempotency_key: str | None = None) -> DecisionResult:
        """Reverse the reviewer's latest decision; pass a key so a double click undoes only once."""
        _check_reviewer(reviewer)
        return self.transaction(lambda s: decisions.undo(s, reviewer=reviewer, key=idempotency_key,
                                                         now=self._clock(), lease_s=self.settings.claim_lease_s),
                                durable=True)

    def counts(self) -> dict:
        out = self.transaction(lambda s: stats.counts(s, self._clock()), read=True)
        out.update(log_pending=self._writer.backlog(), log_pending_bytes=self._writer.backlog_bytes(),
                   log_dropped=self._writer.dropped, log_failed=self._writer.failed,
                   log_replayed=self._writer.replayed)
        return out

    def model_versions(self) -> list[str]:
        return self.transaction(lambda s: list(s.scalars(select(Model.version).order_by(Model.first_seen))),
                                read=True)

    def image_bytes(self, image_sha256: str) -> bytes:
        """Stored bytes of an image (JPEG or PNG). Only for authenticated reviewers: the caller checks that."""
        return self.store.read(check_sha(image_sha256))

    # --- batch jobs (CLI) ------------------------------------------------------------------------------------
    def import_dataset(self, source: Path, predict_probs, *, batch_size: int = 32) -> dataset.ImportStats:
        files = dataset.list_labeled(source)
        result = dataset.ImportStats()
        for i in range(0, len(files), batch_size):
            recs = dataset.score_files(files[i : i + batch_size], predict_probs, self.model_info,
                                       max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_pixels,
                                       now=self._clock(), stats=result)
            result.queued += self._insert(recs)
        return result

    def rescore(self, predict_probs, *, batch_size: int = 32) -> dict:
        todo = self.transaction(lambda s: rescore.labelled_images(s, self.model_info.version), read=True)
        done = {"scored": 0, "queued": 0, "missing_images": 0}
        for i in range(0, len(todo), batch_size):
            recs, missing = rescore.rescore_records(todo[i : i + batch_size], self.store, predict_probs,
                                                    self.model_info, self._clock())
            done["missing_images"] += missing
            done["scored"] += len(recs)
            done["queued"] += self._insert(recs, replace_prediction=True)
        return done

    def _insert(self, recs: list, *, replace_prediction: bool = False) -> int:
        if any(r.data is not None for r in recs) and (full := self._guard.check()):
            raise ReviewError(f"image storage full: {full}")  # a dataset without its images is no use
        stored = ingest.store_images(recs, self.store)
        if stored.error is not None:  # a CLI job: fail loudly rather than import a dataset without its images
            raise stored.error
        self._image_outcome(stored)
        rows, queued = ingest.prediction_rows(recs, self._th)
        self.transaction(lambda s: ingest.insert_rows(s, stored.rows, rows, queued,
                                                      replace_prediction=replace_prediction))
        return len({q["image_sha256"] for q in queued})

    def export(self, out_dir: Path, *, folders: bool = False, valid_pct: float = 0.2) -> export.ExportReport:
        return self.transaction(lambda s: export.export_reviewed(s, self.store, out_dir, folders=folders,
                                                                 valid_pct=valid_pct), read=True)

    def reconcile(self, *, fix: bool = False, grace_s: float = 3600.0) -> maintenance.ReconcileReport:
        return self.transaction(lambda s: maintenance.reconcile(s, self.store, fix=fix, grace_s=grace_s))

    def purge(self, *, days: float | None = None, dry_run: bool = False) -> maintenance.PurgeReport:
        days = days if days is not None else self.settings.retention_days
        if days is None:
            raise ReviewError("no retention period: set LOUPE_RETENTION_DAYS or pass --days")
        cutoff = self._clock() - timedelta(days=days)
        report = self.transaction(lambda s: maintenance.purge(s, cutoff=cutoff, dry_run=dry_run))
        if not dry_run:  # after the commit: a crash here leaves orphan files (reconcile), never dangling rows
            for sha in report.images:
                self.store.delete(sha)
        return report


def _check_reviewer(reviewer: str) -> None:
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise ReviewError("a reviewer name is required")
