"""High-loss rescoring when a new model version is served.

Every image with a known label (claimed by a user or given by an imported dataset) that the served model has not
scored yet gets a new prediction (``source="rescore"``) from it; if the new model confidently contradicts the
label (loss > ``settings.high_loss``) the image is queued as high loss. Items still open switch to the new
model's prediction; items already decided stay decided (a person has settled them; the export has their label).
Running it again only scores what is still missing, so it is cheap to call at every start.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from PIL import Image
from sqlalchemy import and_, exists, select, text
from sqlalchemy.orm import Session, aliased

from review.db import Model, Prediction
from review.imagestore import ImageStore
from review.ingest import PredictionRecord


def labelled_images(session: Session, model_version: str, vocab) -> list[tuple[str, str, dict]]:
    """(image sha, latest claimed label, stats) of labelled images this model version has not scored, where the
    classes match: the label is one of ``vocab`` and it was given under a model whose classes ``vocab`` covers
    (the same classes, or a retrain that added some). A digits model never re-scores a shapes image."""
    mine = aliased(Prediction)
    scored = exists().where(and_(mine.image_sha256 == Prediction.image_sha256, mine.model_version == model_version))
    rows = session.execute(
        select(Prediction.image_sha256, Prediction.claimed_label, Prediction.width, Prediction.height,
               Prediction.brightness, Model.vocab)
        .join(Model, Model.version == Prediction.model_version)
        .where(text("predictions.claimed_label IS NOT NULL"), Prediction.image_sha256.is_not(None), ~scored)
        .order_by(Prediction.created, Prediction.id)).all()
    classes = set(vocab)
    latest: dict[str, tuple[str, dict]] = {}
    for sha, label, width, height, brightness, labelled_under in rows:  # later rows win: the latest claim counts
        if label in classes and set(labelled_under) <= classes:
            latest[sha] = (label, {"width": width, "height": height, "brightness": brightness})
        else:
            latest.pop(sha, None)  # the latest claim belongs to another set of classes: not ours to re-score
    return [(sha, label, st) for sha, (label, st) in latest.items()]


def rescore_records(items: Sequence[tuple[str, str, dict]], store: ImageStore, predict_probs, model_info,
                    now: datetime) -> tuple[list[PredictionRecord], int]:
    """New-model predictions for one chunk; returns (records, images missing from the store)."""
    images, kept = [], []
    for sha, label, st in items:
        if not store.exists(sha):
            continue
        # our own PNG or JPEG (shrunk to store_max_side): no untrusted decoding involved
        with Image.open(io.BytesIO(store.read(sha)), formats=["PNG", "JPEG"]) as im:
            images.append(im.convert("RGB"))
        kept.append((sha, label, st))
    if not kept:
        return [], len(items)
    probs = np.asarray(predict_probs(images))
    vocab = tuple(model_info.vocab)
    records = [PredictionRecord(id=uuid.uuid4().hex, created=now, source="rescore", model_version=model_info.version,
                                vocab=vocab, probs=p, latency_ms=0.0, claimed_label=label, image_sha256=sha,
                                stats=st)
               for (sha, label, st), p in zip(kept, probs, strict=True)]
    return records, len(items) - len(kept)
