"""``ReviewStore``: engines, the one retrying transaction helper, the image store and the background prediction log.

The reviewer desk (review.desk) and the batch jobs (review.jobs) work through it; so do the front ends, to log
predictions and feedback. It knows every registered model's vocabulary, so records of several model versions
(current, canary, shadow, older ones) live side by side.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from review import ingest
from review.db import Model, Prediction, StoredImage, create_all, make_engine, utcnow
from review.imagestore import GB, ImageStore, StorageGuard
from review.spool import Orphan, Spool, claim_orphans
from review.types import SOURCES, ReviewError, UnknownPrediction
from review.writer import BackgroundWriter

log = logging.getLogger(__name__)
_RETRY_SQLSTATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock detected
_RECENT = 10_000  # prediction ids remembered with their model version (feedback may arrive before the row)
MB = 1 << 20
DROP_REPORT_S = 300.0  # /healthz reports dropped log records for this long after the latest drop


class ReviewStore:
    def __init__(self, settings, *, clock: Callable[[], datetime] = utcnow, spool: bool = False):
        """``spool``: the app's store (one per process) spools every logged record before returning its id, so a
        kill -9 loses nothing acknowledged, and replays the spools dead processes left (review.spool). Batch jobs
        and tests leave it off."""
        self.settings = settings
        self.clock = clock
        self.thresholds = ingest.Thresholds.from_settings(settings)
        self.images = ImageStore(settings.images_dir, max_side=settings.store_max_side,
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
        self._vocabs: dict[str, tuple[str, ...]] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()  # prediction id -> model version
        self._recent_lock = threading.Lock()
        self._guard = StorageGuard(
            self.images.root, used=self._stored_bytes, min_free_bytes=int(settings.min_free_disk_gb * GB),
            max_bytes=int(settings.max_storage_gb * GB) or None)
        self._store_error: str | None = None  # why image files cannot be written, until one is (health)
        spool_dir = settings.data_dir / "spool"
        # The app's store replays dead processes' spools even with its own spool switched off.
        self._spool = Spool(spool_dir) if spool and settings.log_spool else None
        orphans = claim_orphans(spool_dir) if spool else []
        self._writer = BackgroundWriter(self._write_batch, maxsize=settings.log_queue_size,
                                        max_bytes=int(settings.log_queue_mb * MB), block_s=settings.log_block_s,
                                        spool=self._spool, replay=self._replay(orphans))
        self._closed = False
        atexit.register(self.close)  # a clean interpreter exit drains the log even if main() forgot to

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

    # --- models ---------------------------------------------------------------------------------------------
    def register_model(self, info) -> None:
        """Record a model version (idempotent), so its predictions can be logged and reviewed in its own vocab."""
        row = {"version": info.version, "name": info.name, "sha256": info.sha256, "vocab": list(info.vocab),
               "first_seen": self.clock()}

        def fn(session: Session) -> None:
            ins = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
            session.execute(ins(Model).on_conflict_do_nothing(index_elements=["version"]), [row])

        self.transaction(fn)
        self._vocabs[info.version] = tuple(info.vocab)

    def vocab(self, version: str) -> tuple[str, ...]:
        if version not in self._vocabs:
            vocab = self.transaction(lambda s: s.scalar(select(Model.vocab).where(Model.version == version)),
                                     read=True)
            if vocab is None:
                raise ReviewError(f"unknown model version {version!r}")
            self._vocabs[version] = tuple(vocab)
        return self._vocabs[version]

    # --- the prediction log ---------------------------------------------------------------------------------
    def log_prediction(self, *, model, data: bytes, stats: dict, probs: np.ndarray, source: str, latency_ms: float,
                       claimed_label: str | None = None, unfamiliar: bool | None = None,
                       unfamiliar_score: float | None = None) -> str:
        """Queue a prediction for the background writer and return its id at once (see review.writer).

        ``data``: the upload's encoded bytes as received (at most settings.max_upload_bytes; the writer decodes,
        shrinks and stores them in the background). ``stats``: what the caller knows of the decoded image, at
        least its (EXIF-rotated) width and height: ``image_stats(img, brightness=False)`` costs nothing; a
        missing brightness or saturation is measured by the writer. With a spool, the record is in it when this
        returns: the id survives a kill -9 (see review.spool).
        """
        if model.version not in self._vocabs:
            raise ReviewError(f"model {model.version} is not registered; call register_model first")
        if source not in SOURCES:
            raise ReviewError(f"unknown source {source!r}")
        vocab = self._vocabs[model.version]
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        if probs.shape != (len(vocab),):
            raise ReviewError(f"probs has {probs.size} values; the model has {len(vocab)} classes")
        _check_label(claimed_label, vocab)
        # Storing off, or the store full: the upload stays in memory only until the writer has measured it.
        keep = self.settings.store_uploads and self._guard.full is None
        pid = uuid.uuid4().hex
        rec = ingest.PredictionRecord(id=pid, created=self.clock(), source=source, model_version=model.version,
                                      vocab=vocab, probs=probs,
                                      latency_ms=float(latency_ms) if math.isfinite(latency_ms) else 0.0,
                                      data=data, claimed_label=claimed_label, keep_image=keep, stats=stats,
                                      unfamiliar=unfamiliar, unfamiliar_score=unfamiliar_score)
        with self._recent_lock:
            self._recent[pid] = model.version
            while len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
        self._writer.submit(rec, key=pid, size=len(data))
        return pid

    def record_feedback(self, prediction_id: str, *, correct: bool | None, claimed_label: str | None,
                        out_of_domain: bool = False) -> None:
        """End-user feedback; ``claimed_label`` (if given) is the label, ``correct`` is stored as given.
        ``out_of_domain``: "none of these" (the image shows none of the classes): queued as such for review."""
        if out_of_domain and (claimed_label is not None or correct):
            raise ReviewError("'none of these' contradicts a label or 'right': send one or the other")
        if correct is None and claimed_label is None and not out_of_domain:
            raise ReviewError("nothing to record: say whether the prediction is right, or give the right answer")
        with self._recent_lock:
            version = self._recent.get(prediction_id) if self._writer.is_pending(prediction_id) else None
        if version is None:
            version = self.transaction(lambda s: s.scalar(select(Prediction.model_version)
                                                          .where(Prediction.id == prediction_id)), read=True)
        if version is None:
            raise UnknownPrediction("unknown prediction id (or it was not stored)")
        _check_label(claimed_label, self.vocab(version))
        self._writer.submit(ingest.FeedbackRecord(prediction_id, correct, claimed_label, out_of_domain))

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
        stored = ingest.store_images(preds, self.images, refuse=refuse)  # files first: no row without its file
        self._image_outcome(stored)
        rows, queued = ingest.prediction_rows(preds, self.thresholds)

        def fn(session: Session) -> None:
            ingest.insert_rows(session, stored.rows, rows, queued)
            ingest.apply_feedback(session, [r for r in records if isinstance(r, ingest.FeedbackRecord)],
                                  self.thresholds)

        self.transaction(fn)

    def write_now(self, records: list, *, replace_prediction: bool = False) -> int:
        """Write records synchronously (batch jobs); returns how many images were queued for review."""
        if any(r.data is not None for r in records) and (full := self._guard.check()):
            raise ReviewError(f"image storage full: {full}")  # a dataset without its images is no use
        stored = ingest.store_images(records, self.images)
        if stored.error is not None:  # a batch job: fail loudly rather than import a dataset without its images
            raise stored.error
        self._image_outcome(stored)
        rows, queued = ingest.prediction_rows(records, self.thresholds)
        self.transaction(lambda s: ingest.insert_rows(s, stored.rows, rows, queued,
                                                      replace_prediction=replace_prediction))
        return len({q["image_sha256"] for q in queued})

    def _image_outcome(self, stored: ingest.StoreOutcome) -> None:
        """Track whether image files can be written; say so once when that changes (not once per record)."""
        if stored.error is not None:
            if self._store_error is None:
                log.error("cannot write images to %s (%s): predictions are logged without their images until this "
                          "is fixed", self.images.root, stored.error)
            self._store_error = f"{type(stored.error).__name__}: {stored.error}"
        elif stored.stored and self._store_error is not None:
            log.warning("images are written to %s again", self.images.root)
            self._store_error = None
        for row in stored.rows:
            self._guard.added(row["size_bytes"])

    def _stored_bytes(self) -> int:
        return int(self.transaction(lambda s: s.scalar(select(func.coalesce(func.sum(StoredImage.size_bytes), 0))),
                                    read=True))

    def _replay(self, orphans: list[Orphan]) -> Iterator[list]:
        """Records of dead processes' spools, in batches; each spool is removed once all its batches are written."""
        for orphan in orphans:
            batch, n = [], 0
            for meta, data in orphan.records():
                vocab: tuple[str, ...] = ()
                if meta["kind"] == "prediction":
                    try:
                        vocab = self.vocab(meta["model_version"])
                    except ReviewError:
                        log.error("spool %s: prediction %s of unknown model %s skipped", orphan.dir, meta["id"],
                                  meta["model_version"])
                        continue
                batch.append(ingest.from_spool(meta, data, vocab))
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
        if not self._writer.alive:
            problems.append("the prediction log writer has stopped: predictions are not logged")
        if self._writer.db_error:
            problems.append(f"database unavailable, the prediction log is retrying: {self._writer.db_error}")
        if self._store_error:
            problems.append(f"images cannot be written to {self.images.root} ({self._store_error}): predictions "
                            "are logged without their images")
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

    def log_status(self) -> dict:
        return {"log_pending": self._writer.backlog(), "log_pending_bytes": self._writer.backlog_bytes(),
                "log_dropped": self._writer.dropped, "log_failed": self._writer.failed,
                "log_replayed": self._writer.replayed}

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


def _check_label(label: str | None, vocab: tuple[str, ...]) -> None:
    if label is not None and label not in vocab:
        raise ReviewError(f"{label!r} is not one of the model's classes")
