"""Accuracy as people see it: the reviewed audit sample (unbiased), agreement per class, the confusion matrix of
reviewed items, and the feedback-loop check (the share of traffic whose answer people later corrected).

``wilson`` is pure; the rest are data functions (they take the session; the caller owns the transaction).

Why the audit sample and not all reviewed items for accuracy: the other reasons pick items the model got wrong
or was unsure about (high loss, low confidence, user flags), so their accuracy says little about traffic. The audit
sample is drawn uniformly from all traffic (``LOUPE_AUDIT_RATE``), so its reviewed share is an unbiased estimate.
Items reviewers marked out of domain or bad image are left out of the rate and counted beside it.
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from review.db import Prediction, QueueEntry

Q = QueueEntry
P = Prediction
SETTLED = ("confirm", "relabel")
EXCLUDED = ("out_of_domain", "bad_image")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials ((nan, nan) when n == 0).

    Unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and does not collapse to a point at 0/n or n/n, which is
    where a small audit sample of a good model lives (e.g. 20/20 -> 0.839-1.0, not 1.0-1.0).
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError("need 0 <= k <= n")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _period(col, since: datetime | None, until: datetime | None) -> list:
    conds = []
    if since is not None:
        conds.append(col >= since)
    if until is not None:
        conds.append(col < until)
    return conds


def audit_accuracy(session: Session, since: datetime | None = None, until: datetime | None = None) -> dict[str, dict]:
    """Per model version: the reviewed audit sample's accuracy with its 95% Wilson interval."""
    correct = func.sum(case((Q.label == Q.predicted, 1), else_=0))
    rows = session.execute(
        select(Q.model_version, Q.outcome, func.count(), correct)
        .where(Q.audit, Q.status == "done", *_period(Q.created, since, until))
        .group_by(Q.model_version, Q.outcome)).all()
    out: dict[str, dict] = {}
    for version, outcome, n, k in rows:
        d = out.setdefault(version, {"reviewed": 0, "correct": 0, "excluded": 0})
        if outcome in SETTLED:
            d["reviewed"] += n
            d["correct"] += int(k or 0)
        elif outcome in EXCLUDED:
            d["excluded"] += n
    for d in out.values():
        n, k = d["reviewed"], d["correct"]
        d["accuracy"] = k / n if n else None
        d["low"], d["high"] = wilson(k, n) if n else (None, None)
    return out


def reviewed_confusion(session: Session, version: str, vocab: tuple[str, ...], since: datetime | None = None,
                       until: datetime | None = None) -> dict:
    """All reviewed items of ``version`` (any reason): the confusion matrix (rows: the reviewers' label, columns:
    the prediction) and human agreement per predicted class (share of its items reviewers confirmed)."""
    rows = session.execute(
        select(Q.label, Q.predicted, func.count())
        .where(Q.model_version == version, Q.status == "done", Q.outcome.in_(SETTLED), Q.label.is_not(None),
               *_period(Q.created, since, until))
        .group_by(Q.label, Q.predicted)).all()
    index = {c: i for i, c in enumerate(vocab)}
    matrix = np.zeros((len(vocab), len(vocab)), dtype=np.int64)
    for label, predicted, n in rows:
        if label in index and predicted in index:
            matrix[index[label], index[predicted]] += n
    per_class = {}
    for j, c in enumerate(vocab):
        n = int(matrix[:, j].sum())
        if n:
            per_class[c] = {"reviewed": n, "agreed": int(matrix[j, j]), "agreement": matrix[j, j] / n}
    return {"classes": list(vocab), "matrix": matrix.tolist(), "per_class": per_class,
            "reviewed": int(matrix.sum())}


def corrected_expr():
    """1 when people later said this answer was wrong: a user claimed another label, or reviewers settled the
    image with another label (relabel, or confirming another prediction of the same image)."""
    return case((or_(and_(P.claimed_label.is_not(None), P.claimed_label != P.predicted),
                     and_(Q.status == "done", Q.label.is_not(None), Q.label != P.predicted)), 1), else_=0)


def corrections_by_bucket(session: Session, bucket, sources: tuple[str, ...], since: datetime | None,
                          until: datetime | None) -> list[tuple[str, int, int]]:
    """[(bucket, predictions, corrected)], oldest first; ``bucket`` is a SQL expression over the prediction's
    time (review/period.py)."""
    rows = session.execute(
        select(bucket.label("b"), func.count(), func.sum(corrected_expr()))
        .select_from(P).outerjoin(Q, Q.image_sha256 == P.image_sha256)
        .where(P.source.in_(sources), *_period(P.created, since, until))
        .group_by("b").order_by("b")).all()
    return [(b, int(n), int(k or 0)) for b, n, k in rows]
