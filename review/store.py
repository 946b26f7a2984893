"""``ReviewStore``: engines, the one retrying transaction helper, the image store and the background prediction log.

The reviewer desk (review.desk) and the batch jobs (review.jobs) work through it; so do the front ends, to log
predictions and feedback. It knows every registered model's vocabulary, so records of several model versions
(current, canary, shadow, older ones) live side by side.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from review import ingest
from review.db import Model, Prediction, create_all, make_engine, utcnow
from review.imagestore import ImageStore
from review.types import SOURCES, ReviewError, UnknownPrediction
from review.writer import BackgroundWriter

_RETRY_SQLSTATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock detected
_RECENT = 10_000  # prediction ids remembered with their model version (feedback may arrive before the row)


class ReviewStore:
    def __init__(self, settings, *, clock: Callable[[], datetime] = utcnow):
        self.settings = settings
        self.clock = clock
        self.thresholds = ingest.Thresholds.from_settings(settings)
        self.images = ImageStore(settings.images_dir)
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
        self._writer = BackgroundWriter(self._write_batch, maxsize=settings.log_queue_size,
                                        block_s=settings.log_block_s)
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
    def log_prediction(self, *, model, data: bytes | None = None, image: Image.Image, probs: np.ndarray,
                       source: str, latency_ms: float, claimed_label: str | None = None) -> str:
        """Queue a prediction for the background writer and return its id at once (see review.writer)."""
        if model.version not in self._vocabs:
            raise ReviewError(f"model {model.version} is not registered; call register_model first")
        if source not in SOURCES:
            raise ReviewError(f"unknown source {source!r}")
        vocab = self._vocabs[model.version]
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        if probs.shape != (len(vocab),):
            raise ReviewError(f"probs has {probs.size} values; the model has {len(vocab)} classes")
        _check_label(claimed_label, vocab)
        pid = uuid.uuid4().hex
        rec = ingest.PredictionRecord(id=pid, created=self.clock(), source=source, model_version=model.version,
                                      vocab=vocab, probs=probs,
                                      latency_ms=float(latency_ms) if math.isfinite(latency_ms) else 0.0,
                                      image=image, claimed_label=claimed_label,
                                      keep_image=self.settings.store_uploads)
        with self._recent_lock:
            self._recent[pid] = model.version
            while len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
        self._writer.submit(rec, key=pid)
        return pid

    def record_feedback(self, prediction_id: str, *, correct: bool | None, claimed_label: str | None) -> None:
        """End-user feedback; ``claimed_label`` (if given) is the label, ``correct`` is stored as given."""
        if correct is None and claimed_label is None:
            raise ReviewError("nothing to record: say whether the prediction is right, or give the right answer")
        with self._recent_lock:
            version = self._recent.get(prediction_id) if self._writer.is_pending(prediction_id) else None
        if version is None:
            version = self.transaction(lambda s: s.scalar(select(Prediction.model_version)
                                                          .where(Prediction.id == prediction_id)), read=True)
        if version is None:
            raise UnknownPrediction("unknown prediction id (or it was not stored)")
        _check_label(claimed_label, self.vocab(version))
        self._writer.submit(ingest.FeedbackRecord(prediction_id, correct, claimed_label))

    def _write_batch(self, records: list) -> None:
        preds = [r for r in records if isinstance(r, ingest.PredictionRecord)]
        images = ingest.store_images(preds, self.images)  # files first: a row never points at a missing file
        rows, queued = ingest.prediction_rows(preds, self.thresholds)

        def fn(session: Session) -> None:
            ingest.insert_rows(session, images, rows, queued)
            ingest.apply_feedback(session, [r for r in records if isinstance(r, ingest.FeedbackRecord)],
                                  self.thresholds)

        self.transaction(fn)

    def write_now(self, records: list, *, replace_prediction: bool = False) -> int:
        """Write records synchronously (batch jobs); returns how many images were queued for review."""
        images = ingest.store_images(records, self.images)
        rows, queued = ingest.prediction_rows(records, self.thresholds)
        self.transaction(lambda s: ingest.insert_rows(s, images, rows, queued, replace_prediction=replace_prediction))
        return len({q["image_sha256"] for q in queued})

    def log_status(self) -> dict:
        return {"log_pending": self._writer.backlog(), "log_dropped": self._writer.dropped,
                "log_failed": self._writer.failed}

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


def _check_label(label: str | None, vocab: tuple[str, ...]) -> None:
    if label is not None and label not in vocab:
        raise ReviewError(f"{label!r} is not one of the model's classes")
