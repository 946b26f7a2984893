"""Turn logged predictions and feedback into rows: image files first, then rows in the caller's transaction."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from model.reference import measure
from review import scoring
from review.db import Model, Prediction, QueueEntry, StoredImage
from review.imagestore import ImageStore
from review.types import CLAIMED_OUT_OF_DOMAIN, DATASET, HIGH_LOSS, REASONS, USER_FLAGGED
from serving.imageio import ImageRejected

# What the writer measures from the decoded upload when the request did not (model.reference.measure)
MEASURED = ("brightness", "saturation")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    low_confidence: float
    low_margin: float
    high_loss: float
    audit_rate: float
    second_opinion_rate: float

    @classmethod
    def from_settings(cls, settings) -> Thresholds:
        return cls(settings.low_confidence, settings.low_margin, settings.high_loss, settings.audit_rate,
                   settings.second_opinion_rate)


@dataclass
class PredictionRecord:
    id: str
    created: datetime
    source: str
    model_version: str
    vocab: tuple[str, ...]
    probs: np.ndarray  # (C,)
    latency_ms: float
    # The upload's encoded bytes, as received (None: already stored, image_sha256 given; or nothing left).
    # Encoded, not decoded: a 8 MB JPEG is 120 MB of pixels, and records wait in a queue.
    data: bytes | None = field(default=None, repr=False)
    claimed_label: str | None = None
    # False when storing uploads is off or the store is full: no file, no review, and the bytes never reach
    # the disk (not even the spool); the writer only measures them (brightness, saturation) and drops them.
    keep_image: bool = True
    image_sha256: str | None = None
    stats: dict = field(default_factory=dict)  # width/height from the request; MEASURED if missing: the writer

    image_row: dict | None = None  # set once the file is written, so a retried batch does not lose it
    # Dataset audits (review.audit): the label's quality score; the item is queued (reason "dataset") iff
    # label_issue, with a priority that follows the score, instead of by the high-loss threshold.
    label_quality: float | None = None
    label_issue: bool = False
    replayed: bool = False  # recovered from a dead process's spool: may already be in the database
    unfamiliar: bool | None = None  # model/unfamiliar.py's flag (None: unknown) and score
    unfamiliar_score: float | None = None

    def spooled(self) -> tuple[dict, bytes | None]:
        """(metadata, payload) for review.spool; ``from_spool`` reverses it."""
        meta = {"kind": "prediction", "id": self.id, "created": self.created.isoformat(), "source": self.source,
                # float32 bytes as hex: exact, and 1,000 classes cost microseconds (a JSON list costs ~100x that)
                "model_version": self.model_version, "probs": self.probs.astype("<f4").tobytes().hex(),
                "latency_ms": self.latency_ms,
                "claimed_label": self.claimed_label, "keep_image": self.keep_image, "stats": self.stats,
                "unfamiliar": self.unfamiliar, "unfamiliar_score": self.unfamiliar_score}
        return meta, self.data if self.keep_image else None


@dataclass(frozen=True)
class FeedbackRecord:
    prediction_id: str
    correct: bool | None
    claimed_label: str | None
    out_of_domain: bool = False  # "none of these": the image shows none of the model's classes

    def spooled(self) -> tuple[dict, None]:
        return {"kind": "feedback", "prediction_id": self.prediction_id, "correct": self.correct,
                "claimed_label": self.claimed_label, "out_of_domain": self.out_of_domain}, None


def from_spool(meta: dict, data: bytes, vocab: tuple[str, ...]) -> PredictionRecord | FeedbackRecord:
    if meta["kind"] == "feedback":
        return FeedbackRecord(meta["prediction_id"], meta["correct"], meta["claimed_label"],
                              bool(meta.get("out_of_domain", False)))  # spools of earlier releases lack it
    return PredictionRecord(id=meta["id"], created=datetime.fromisoformat(meta["created"]), source=meta["source"],
                            model_version=meta["model_version"], vocab=vocab,
                            probs=np.frombuffer(bytes.fromhex(meta["probs"]), dtype="<f4").astype(np.float32),
                            latency_ms=meta["latency_ms"],
                            data=data or None, claimed_label=meta["claimed_label"], keep_image=meta["keep_image"],
                            stats=meta["stats"], replayed=True, unfamiliar=meta.get("unfamiliar"),
                            unfamiliar_score=meta.get("unfamiliar_score"))


@dataclass
class StoreOutcome:
    rows: list[dict]  # image rows to insert
    stored: int = 0  # files written (or found already there)
    error: OSError | None = None  # the last failure to write a file (an unwritable or full disk)


def store_images(records: list[PredictionRecord], store: ImageStore, *, refuse: bool = False) -> StoreOutcome:
    """Decode each record's upload once: measure what the request path left out (MEASURED) and write the
    image file (idempotent) if it is to be kept. No database access. ``refuse``: the storage guard says the
    store is full, so no new file is written. A record whose file cannot be written keeps its prediction row,
    without an image; the caller reports ``error`` (health) instead of losing the prediction."""
    out = StoreOutcome(rows=[])
    for rec in records:
        data, rec.data = rec.data, None  # free the upload as soon as it is dealt with
        store_it = rec.keep_image and not refuse
        if data is None or not (store_it or _unmeasured(rec.stats)):
            continue
        try:
            img, lossless_source = store.decode(data)
        except ImageRejected as exc:  # accepted at request time, so limits changed or the bytes are damaged
            log.warning("prediction %s: image not stored: %s", rec.id, exc.args[0])
            continue
        if _unmeasured(rec.stats):  # JPEGs decode at reduced scale: the means stay the same
            rec.stats = {**{k: v for k, v in measure(img).items() if k in MEASURED}, **rec.stats}
        if not store_it:
            continue
        try:
            stored = store.put_image(img, lossless_source=lossless_source)
        except OSError as exc:
            out.error = exc
            continue
        out.stored += 1
        rec.image_sha256 = stored.sha256
        rec.image_row = {"sha256": stored.sha256, "width": stored.width, "height": stored.height,
                         "size_bytes": stored.size_bytes, "created": rec.created}
    out.rows = [rec.image_row for rec in records if rec.image_row is not None]
    return out


def prediction_rows(records: list[PredictionRecord], th: Thresholds) -> tuple[list[dict], list[dict]]:
    """Score records (vectorised per model) -> (prediction rows, queue rows). Pure apart from hashing."""
    preds, queue = [], []
    by_model: dict[str, list[PredictionRecord]] = {}
    for rec in records:
        by_model.setdefault(rec.model_version, []).append(rec)
    for group in by_model.values():
        vocab = group[0].vocab
        probs = np.stack([np.asarray(r.probs, dtype=np.float64) for r in group])
        conf, marg, ent = scoring.confidence(probs), scoring.margin(probs), scoring.entropy(probs)
        index = {c: i for i, c in enumerate(vocab)}
        labels = np.array([index.get(r.claimed_label, -1) if r.claimed_label else -1 for r in group])
        loss = scoring.loss(labels, probs)
        is_ds = np.array([r.source == "dataset" for r in group])
        audit = scoring.is_audit([r.id for r in group], th.audit_rate)
        odd = np.array([bool(r.unfamiliar) for r in group])
        reasons = scoring.review_reasons(conf, marg, loss, audit, low_confidence=th.low_confidence,
                                         low_margin=th.low_margin, high_loss=th.high_loss, dataset=is_ds,
                                         unfamiliar=odd)
        # a rescore is not traffic: only its (new) loss against the known label can queue it
        reasons = np.where([r.source == "rescore" for r in group], reasons & HIGH_LOSS, reasons)
        prio = scoring.queue_priority(reasons, conf, marg, loss)
        audited = np.array([r.label_quality is not None for r in group])
        if audited.any():
            quality = np.array([1.0 if r.label_quality is None else r.label_quality for r in group])
            issue = np.array([r.label_issue for r in group])
            reasons = np.where(audited, np.where(issue, DATASET, 0), reasons)
            prio = np.where(audited, scoring.label_issue_priority(quality), prio)
        top = probs.argmax(axis=1)
        for i, rec in enumerate(group):
            row = {
                "id": rec.id, "created": rec.created, "source": rec.source, "model_version": rec.model_version,
                "image_sha256": rec.image_sha256, "predicted": vocab[top[i]],
                "probs": [round(float(p), 6) for p in probs[i]], "confidence": float(conf[i]),
                "margin": float(marg[i]), "entropy": float(ent[i]), "latency_ms": float(rec.latency_ms),
                "width": rec.stats.get("width"), "height": rec.stats.get("height"),
                "brightness": rec.stats.get("brightness"), "saturation": rec.stats.get("saturation"),
                "feedback_correct": None,
                "claimed_label": rec.claimed_label, "loss": None if math.isnan(loss[i]) else float(loss[i]),
                "unfamiliar": rec.unfamiliar, "unfamiliar_score": rec.unfamiliar_score,
            }
            preds.append(row)
            if reasons[i] and rec.image_sha256:
                queue.append(queue_row(row, int(reasons[i]), float(prio[i]), th))
    return preds, queue


def queue_row(pred: dict, mask: int, priority: float, th: Thresholds) -> dict:
    sha = pred["image_sha256"]
    second = bool(scoring.needs_second_opinion([sha], th.second_opinion_rate)[0])
    row = {name: bool(mask & bit) for name, bit in REASONS.items()}
    row.update(image_sha256=sha, prediction_id=pred["id"], predicted=pred["predicted"],
               model_version=pred["model_version"], priority=priority, status="open",
               required_decisions=2 if second else 1, n_decisions=0, created=pred["created"])
    return row


def insert_rows(session: Session, images: list[dict], preds: list[dict], queue: list[dict], *,
                replace_prediction: bool = False) -> None:
    dialect = session.get_bind().dialect.name
    ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
    if images:
        session.execute(ins(StoredImage).on_conflict_do_nothing(index_elements=["sha256"]), _unique(images, "sha256"))
    if preds:
        session.execute(ins(Prediction), preds)
    upsert_queue(session, queue, replace_prediction=replace_prediction)


def upsert_queue(session: Session, rows: list[dict], *, replace_prediction: bool = False) -> None:
    """Queue images; an image already queued and still open gains the new reasons (duplicates reviewed once).

    Rows are merged per image and written oldest first (ties by sha): new items get ids in arrival order, which
    is the queue's tie-break within a tier ("oldest first"), however the background writer batched them. Two
    replicas upserting the same images in a different order can deadlock on PostgreSQL; the database detects it
    and the transaction is retried (40P01, see ReviewStore.transaction and the writer's retry). Decided items
    stay decided.
    """
    if not rows:
        return
    merged: dict[str, dict] = {}
    for row in rows:
        old = merged.get(row["image_sha256"])
        if old is None:
            merged[row["image_sha256"]] = dict(row)
            continue
        for name in REASONS:
            old[name] = old[name] or row[name]
        old["priority"] = max(old["priority"], row["priority"])
    dialect = session.get_bind().dialect.name
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(QueueEntry)
    greatest = func.greatest if dialect == "postgresql" else func.max
    update = {name: or_(getattr(QueueEntry, name), getattr(stmt.excluded, name)) for name in REASONS}
    update["priority"] = greatest(QueueEntry.priority, stmt.excluded.priority)
    if replace_prediction:  # rescoring: show reviewers the current model's view of an open item
        for col in ("prediction_id", "predicted", "model_version"):
            update[col] = getattr(stmt.excluded, col)
    stmt = stmt.on_conflict_do_update(index_elements=["image_sha256"], set_=update,
                                      where=QueueEntry.status == "open")
    session.execute(stmt, sorted(merged.values(), key=lambda r: (r["created"], r["image_sha256"])))


def apply_feedback(session: Session, records: list[FeedbackRecord], th: Thresholds) -> None:
    """A claimed label makes the loss known; a confident contradiction (or a bare "wrong") gets queued."""
    vocabs: dict[str, list] = {}
    for fb in records:
        pred = session.get(Prediction, fb.prediction_id)
        if pred is None:
            raise LookupError(f"feedback for unknown prediction {fb.prediction_id}")
        if pred.model_version not in vocabs:
            vocabs[pred.model_version] = session.scalar(select(Model.vocab).where(Model.version == pred.model_version))
        vocab = vocabs[pred.model_version]
        if fb.out_of_domain:  # no class applies: the answer was wrong, and no label (and no loss) follows
            pred.feedback_correct = False
            if pred.image_sha256:
                prio = scoring.queue_priority([CLAIMED_OUT_OF_DOMAIN], [pred.confidence], [pred.margin], [np.nan])
                row = {"id": pred.id, "image_sha256": pred.image_sha256, "predicted": pred.predicted,
                       "model_version": pred.model_version, "created": pred.created}
                session.flush()
                upsert_queue(session, [queue_row(row, CLAIMED_OUT_OF_DOMAIN, float(prio[0]), th)])
            continue
        claimed = fb.claimed_label or (pred.predicted if fb.correct else None)
        probs = np.asarray([pred.probs])
        idx = vocab.index(claimed) if claimed in vocab else -1
        loss = scoring.loss([idx], probs)
        # A bare "the right answer is X" (an API client that sent only the label) says whether it was right too.
        correct = fb.correct if fb.correct is not None or claimed is None else claimed == pred.predicted
        pred.feedback_correct, pred.claimed_label = correct, claimed
        pred.loss = None if math.isnan(loss[0]) else float(loss[0])
        flagged = fb.correct is False and claimed is None
        mask = scoring.review_reasons([pred.confidence], [pred.margin], loss, [False], flagged=[flagged],
                                      low_confidence=th.low_confidence, low_margin=th.low_margin,
                                      high_loss=th.high_loss, dataset=[pred.source == "dataset"])
        mask = mask & (HIGH_LOSS | USER_FLAGGED | DATASET)  # the log-time reasons were applied already
        if mask[0] and pred.image_sha256:
            prio = scoring.queue_priority(mask, [pred.confidence], [pred.margin], loss)
            row = {"id": pred.id, "image_sha256": pred.image_sha256, "predicted": pred.predicted,
                   "model_version": pred.model_version, "created": pred.created}
            session.flush()
            upsert_queue(session, [queue_row(row, int(mask[0]), float(prio[0]), th)])


def _unmeasured(stats: dict) -> bool:
    return any(k not in stats for k in MEASURED)


def _unique(rows: list[dict], key: str) -> list[dict]:
    seen: dict = {}
    for row in rows:
        seen.setdefault(row[key], row)
    return list(seen.values())
