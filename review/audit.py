"""Label audits of a labelled dataset: ``audit_dataset`` (out-of-fold, K fresh models) and the shared queueing.

Why out of fold: a model trained on an image has learnt its label, wrong or not, so it cannot audit that label
(measured in issue 8: a served model found 0-3 % of the flipped labels among its own training images). Here K
models are trained with the retraining recipe (model.train) from fresh weights, each on K-1 folds, and every image
is scored by the one model that did not see it. Folds are stratified by label and drawn by a hash of the image
content, so the same dataset always gets the same folds and the same audit version.

Queueing (``queue_records``): the score is ``review.scoring.label_quality`` (``DEFAULT_METHOD``); the items queued
are the likely label issues (``scoring.label_issue_candidates``: the model that did not see the image prefers
another class, or confident learning flags it), lowest quality first (``scoring.label_issue_priority``), or every
item with ``queue="all"``. No fixed loss threshold. README "Close the loop" gives the measurements behind this.

The audit's fold ensemble is registered as a model version ``<name>-oof@<hash of the folds>`` (the ``models``
table, with the vocab), so the reviewer sees the out-of-fold probabilities as that "model"'s view. Re-running the
same audit logs nothing twice: the same (image content, label) under the same version is skipped, and when every
item is already logged the K models are not even trained.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from model.predictor import ModelInfo
from model.progress import Progress, say
from review import scoring
from review.db import Prediction
from review.ingest import PredictionRecord
from review.store import ReviewStore
from review.trainset import BaseImage
from review.types import ReviewError

DEFAULT_METHOD = "self_confidence"
QUEUE_MODES = ("flagged", "all")


@dataclass
class AuditReport:
    source: str
    model_version: str  # the audit's "<name>-oof@<hash>" (or the served model's version for import-dataset)
    files: int = 0
    images: int = 0  # distinct images with a label in the vocab
    already: int = 0  # already logged for this version with this label: not logged again
    imported: int = 0  # logged now
    flagged: int = 0  # likely label issues (scoring.label_issue_candidates) in the whole dataset
    queued: int = 0
    unknown_labels: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)
    folds: int = 0
    method: str = DEFAULT_METHOD
    train_seconds: float = 0.0
    images_per_s: float = 0.0  # scoring rate
    trained_on: int | None = None  # import-dataset: images the served model was trained on (None: unknown)
    disagreement: float | None = None  # share of labels the (out-of-fold) model's top class contradicts
    review_at: str = ""


def fold_ids(shas: Sequence[str], labels: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Stratified folds: within each label, images ordered by a hash of their content are dealt round-robin."""
    if k < 2:
        raise ReviewError("--folds must be at least 2")
    h = scoring.unit_hash(list(shas), f"fold:{seed}:")
    labels = np.asarray(labels)
    out = np.zeros(len(h), dtype=np.int64)
    offset = 0
    for label in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == label)
        idx = idx[np.argsort(h[idx], kind="stable")]
        out[idx] = (np.arange(len(idx)) + offset) % k  # offset: small classes do not all start in fold 0
        offset += len(idx)
    return out


def audit_info(name: str, base: Sequence[BaseImage], folds: np.ndarray, recipe: dict, vocab: Sequence[str]
               ) -> ModelInfo:
    """The fold ensemble as a model version: its sha256 names the exact folds, recipe and classes."""
    key = {"items": sorted((b.sha256, b.label, int(f)) for b, f in zip(base, folds, strict=True)),
           "recipe": recipe, "vocab": list(vocab)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return ModelInfo(f"{name}-oof", digest, tuple(vocab), "oof")


def already_logged(store: ReviewStore, version: str, base: Sequence[BaseImage]) -> set[tuple[str, str]]:
    """(image sha256, label) pairs this version has already logged from a dataset."""
    shas = sorted({b.sha256 for b in base})

    def fn(session) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        for i in range(0, len(shas), 500):
            found |= set(session.execute(select(Prediction.image_sha256, Prediction.claimed_label).where(
                Prediction.model_version == version, Prediction.source == "dataset",
                Prediction.image_sha256.in_(shas[i:i + 500]))).all())
        return found

    return store.transaction(fn, read=True)


def label_scores(base: Sequence[BaseImage], vocab: Sequence[str], probs: np.ndarray, method: str = DEFAULT_METHOD
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(label quality, likely label issue) per image; the per-class thresholds are computed over all of them."""
    index = {c: i for i, c in enumerate(vocab)}
    labels = np.array([index[b.label] for b in base], dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return scoring.label_quality(labels, probs, method), scoring.label_issue_candidates(labels, probs)


def queue_records(store: ReviewStore, info: ModelInfo, base: Sequence[BaseImage], probs: np.ndarray,
                  quality: np.ndarray, issues: np.ndarray, *, queue: str = "flagged", chunk: int = 500) -> int:
    """Log each image with its probabilities and label (source "dataset"); queue the likely label errors (or all,
    ``queue="all"``), ordered by quality. Returns how many images were queued."""
    if queue not in QUEUE_MODES:
        raise ReviewError(f"unknown queue mode {queue!r}; choose one of {', '.join(QUEUE_MODES)}")
    chosen = np.asarray(issues, bool) if queue == "flagged" else np.ones(len(base), bool)
    now = store.clock()
    queued = 0
    for i in range(0, len(base), chunk):
        records = []
        for j in range(i, min(i + chunk, len(base))):
            b = base[j]
            rec = PredictionRecord(id=uuid.uuid4().hex, created=now, source="dataset", model_version=info.version,
                                   vocab=info.vocab, probs=probs[j], latency_ms=0.0, claimed_label=b.label,
                                   image_sha256=b.sha256, stats=dict(b.stats), label_quality=float(quality[j]),
                                   label_issue=bool(chosen[j]))
            rec.image_row = {"sha256": b.sha256, "width": b.stats.get("width", 0), "height": b.stats.get("height", 0),
                             "size_bytes": b.size_bytes, "created": now}
            records.append(rec)
        queued += store.write_now(records)
    return queued


def review_address(settings) -> str:
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "localhost"
    return f"http://{host}:{settings.port}/review/"


def out_of_fold(base: Sequence[BaseImage], images, vocab: Sequence[str], recipe, folds: np.ndarray, *,
                progress: bool = True) -> tuple[np.ndarray, float, float]:
    """(probabilities, training seconds, scoring images/s): each image scored by the fold model that left it out."""
    from model import train as T

    items = [T.Item(images.path(b.sha256), b.label, b.sha256) for b in base]
    probs = np.zeros((len(items), len(vocab)), dtype=np.float32)
    k = int(folds.max()) + 1
    train_s, score_s = 0.0, 0.0
    for f in range(k):
        held = np.flatnonzero(folds == f)
        # The held-out fold is the validation set: each epoch's valid loss is this fold's out-of-fold loss.
        learn, seconds = T.train(items, vocab, recipe, valid=folds == f, title=f"fold {f + 1}/{k}", progress=progress)
        train_s += seconds
        start = time.perf_counter()
        probs[held] = T.predict_paths(learn, [items[i].path for i in held])
        score_s += time.perf_counter() - start
    return probs, train_s, (len(items) / score_s if score_s > 0 else 0.0)


def audit_dataset(store: ReviewStore, source: str | Path, *, vocab: Sequence[str] | None, name: str, recipe,
                  folds: int = 5, method: str = DEFAULT_METHOD, queue: str = "flagged", seed: int = 0,
                  progress: bool = True) -> AuditReport:
    """Out-of-fold audit of a labelled folder / labels.csv / "demo". ``vocab``: the classes to audit (labels
    outside it are skipped and listed); None: the dataset's own classes."""
    from review import trainset

    settings = store.settings
    reading = Progress(0, "reading", enabled=progress)
    base, loaded = trainset.load_base(source, store.images, max_bytes=settings.max_upload_bytes,
                                      max_pixels=settings.max_pixels, vocab=set(vocab) if vocab else None,
                                      progress=reading)
    reading.close(f"{loaded.images:,} images")
    classes = tuple(vocab) if vocab else tuple(sorted({b.label for b in base}))
    report = AuditReport(str(source), "", files=loaded.files, images=len(base), unknown_labels=loaded.unknown_labels,
                         rejected=loaded.rejected, duplicates=loaded.duplicates, conflicts=loaded.conflicts,
                         folds=folds, method=method, review_at=review_address(settings))
    if len(base) < 2 * folds:
        raise ReviewError(f"{len(base)} usable images: too few for {folds} folds (need at least {2 * folds})")
    fold = fold_ids([b.sha256 for b in base], [b.label for b in base], folds, seed)
    info = audit_info(name, base, fold, recipe.to_dict(), classes)
    report.model_version = info.version
    done = already_logged(store, info.version, base)
    report.already = sum((b.sha256, b.label) in done for b in base)
    if report.already == len(base):
        say(f"already audited: all {len(base):,} images are logged under {info.version}; nothing to do")
        return report
    store.register_model(info)
    probs, report.train_seconds, report.images_per_s = out_of_fold(base, store.images, classes, recipe, fold,
                                                                   progress=progress)
    # Scores over the whole dataset, then only the missing rows are logged: the same queue as an uninterrupted run.
    quality, issues = label_scores(base, classes, probs, method)
    todo = np.array([(b.sha256, b.label) not in done for b in base])
    report.queued = queue_records(store, info, [b for b, t in zip(base, todo, strict=True) if t], probs[todo],
                                  quality[todo], issues[todo], queue=queue)
    report.imported, report.flagged = int(todo.sum()), int(issues.sum())
    report.disagreement = disagreement(base, classes, probs)
    return report


def disagreement(base: Sequence[BaseImage], vocab: Sequence[str], probs: np.ndarray) -> float:
    index = {c: i for i, c in enumerate(vocab)}
    return float(np.mean(np.asarray(probs).argmax(axis=1) != np.array([index[b.label] for b in base])))
