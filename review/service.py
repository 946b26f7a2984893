"""``ReviewService``: the facade the UI, the REST API and the CLI use. It owns engines and transactions.

Authentication is the caller's job: every reviewer-side method takes a reviewer name the caller has already
authenticated (review.auth), and ``image_bytes`` must only be served to such a caller.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from review import dataset, decisions, export, ingest, maintenance, queue, rescore, stats
from review.db import Model, Prediction, create_all, make_engine, utcnow
from review.imagestore import ImageStore, check_sha
from review.types import SOURCES, DecisionResult, QueueItem, ReviewError, UnknownPrediction
from review.writer import BackgroundWriter

_RETRY_SQLSTATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock detected


class ReviewService:
    def __init__(self, settings, model_info, *, clock: Callable[[], datetime] = utcnow):
        self.settings = settings
        self.model_info = model_info
        # model_info=None: maintenance only (CLI export/reconcile/purge); logging needs a model
        self.vocab: tuple[str, ...] = tuple(model_info.vocab) if model_info is not None else ()
        self._clock = clock
        self._th = ingest.Thresholds.from_settings(settings)
        self.store = ImageStore(settings.images_dir)
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
        self._writer = BackgroundWriter(self._write_batch, maxsize=settings.log_queue_size,
                                        block_s=settings.log_block_s)
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
    def log_prediction(self, *, image: Image.Image, probs: np.ndarray, source: str, latency_ms: float,
                       claimed_label: str | None = None) -> str:
        """Queue a prediction for the background writer and return its id at once (see review.writer)."""
        if self.model_info is None:
            raise ReviewError("this ReviewService was built without a model; it cannot log predictions")
        if source not in SOURCES:
            raise ReviewError(f"unknown source {source!r}")
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        if probs.shape != (len(self.vocab),):
            raise ReviewError(f"probs has {probs.size} values; the model has {len(self.vocab)} classes")
        self._check_label(claimed_label)
        pid = uuid.uuid4().hex
        rec = ingest.PredictionRecord(id=pid, created=self._clock(), source=source,
                                      model_version=self.model_info.version, vocab=self.vocab, probs=probs,
                                      latency_ms=float(latency_ms) if math.isfinite(latency_ms) else 0.0,
                                      image=image, claimed_label=claimed_label,
                                      keep_image=self.settings.store_uploads)
        self._writer.submit(rec, key=pid)
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
        images = ingest.store_images(preds, self.store)  # files first: a row never points at a missing file
        rows, queued = ingest.prediction_rows(preds, self._th)

        def fn(session: Session) -> None:
            ingest.insert_rows(session, images, rows, queued)
            ingest.apply_feedback(session, [r for r in records if isinstance(r, ingest.FeedbackRecord)], self._th)

        self.transaction(fn)

    def flush(self) -> None:
        """Wait until every prediction logged so far is in the database (tests, CLI, shutdown)."""
        self._writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
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
        out.update(log_pending=self._writer.backlog(), log_dropped=self._writer.dropped,
                   log_failed=self._writer.failed)
        return out

    def model_versions(self) -> list[str]:
        return self.transaction(lambda s: list(s.scalars(select(Model.version).order_by(Model.first_seen))),
                                read=True)

    def image_bytes(self, image_sha256: str) -> bytes:
        """PNG bytes of a stored image. Only for authenticated reviewers: the caller checks that."""
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
        images = ingest.store_images(recs, self.store)
        rows, queued = ingest.prediction_rows(recs, self._th)
        self.transaction(lambda s: ingest.insert_rows(s, images, rows, queued, replace_prediction=replace_prediction))
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
