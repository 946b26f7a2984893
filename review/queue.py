"""Claiming queue items with an expiring lease, and the reviewer's view of an item.

A reviewer holds at most one claim: asking again returns the same item (lease renewed) as long as it matches the
filters; otherwise the old claim is released first. Claims are a lease, not a lock: an abandoned tab costs
``claim_lease_s`` at most, then the item is offered again.

PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` then UPDATE, so concurrent reviewers skip each other's rows
instead of waiting. SQLite: one ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING id``; the transaction
began IMMEDIATE, so no two claims interleave.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import exists, func, or_, select, text, update
from sqlalchemy.orm import Session

from review.db import Model, Prediction, QueueEntry, ReviewerMark
from review.types import REASONS, QueueItem, ReviewError

Q = QueueEntry
# Literal SQL, not bound parameters: SQLite (and PostgreSQL generic plans) only use a partial index when the
# query repeats the index's WHERE terms verbatim.
OPEN = text("queue_items.status = 'open'")


def filters(*, reason: str | None = None, predicted: str | None = None, model_version: str | None = None) -> list:
    conds = [OPEN]
    if reason is not None:
        if reason not in REASONS:
            raise ReviewError(f"unknown reason {reason!r}; choose one of {', '.join(REASONS)}")
        conds.append(text(f"queue_items.{reason}"))  # name checked against REASONS above
    if predicted is not None:
        conds.append(Q.predicted == predicted)
    if model_version is not None:
        conds.append(Q.model_version == model_version)
    return conds


def _matches(entry: QueueEntry, reason, predicted, model_version) -> bool:
    return ((reason is None or bool(getattr(entry, reason))) and (predicted is None or entry.predicted == predicted)
            and (model_version is None or entry.model_version == model_version))


def claim_next(session: Session, reviewer: str, *, now: datetime, lease_s: float, reason: str | None = None,
               predicted: str | None = None, model_version: str | None = None) -> QueueEntry | None:
    conds = filters(reason=reason, predicted=predicted, model_version=model_version)
    until = now + timedelta(seconds=lease_s)
    # No status term here: SQLite would then pick ix_queue_next (status=?) and walk every open item instead of
    # the tiny ix_queue_claimed. Settled items never keep a claim, so the status check in Python is enough.
    # Newest lease first: an undo hands the undone item back with a fresh lease, and that is the one to show.
    held = session.scalars(select(Q).where(Q.claimed_by == reviewer).order_by(Q.lease_until.desc(), Q.id)).all()
    keep = next((e for e in held if e.status == "open" and e.lease_until is not None and e.lease_until > now
                 and _matches(e, reason, predicted, model_version)), None)
    others = [e.id for e in held if e is not keep]
    if others:  # e.g. two tabs of one reviewer claimed at once (PostgreSQL): keep one claim per reviewer
        session.execute(update(Q).where(Q.id.in_(others)).values(claimed_by=None, lease_until=None))
    if keep is not None:
        keep.lease_until = until
        return keep
    seen = exists().where(ReviewerMark.item_id == Q.id, ReviewerMark.reviewer == reviewer)
    pick = (select(Q.id).where(*conds, or_(Q.lease_until.is_(None), Q.lease_until < now), ~seen)
            .order_by(Q.priority.desc(), Q.id).limit(1))
    if session.get_bind().dialect.name == "postgresql":
        item_id = session.scalar(pick.with_for_update(of=Q, skip_locked=True))
        if item_id is None:
            return None
        session.execute(update(Q).where(Q.id == item_id).values(claimed_by=reviewer, lease_until=until))
    else:
        item_id = session.scalar(update(Q).where(Q.id == pick.scalar_subquery())
                                 .values(claimed_by=reviewer, lease_until=until).returning(Q.id))
        if item_id is None:
            return None
    return session.get(Q, item_id, populate_existing=True)


def release(session: Session, reviewer: str) -> int:
    """Give back the reviewer's claims (logout, closed tab)."""
    return session.execute(update(Q).where(Q.claimed_by == reviewer).values(claimed_by=None, lease_until=None)
                           ).rowcount


def to_view(session: Session, entry: QueueEntry) -> QueueItem:
    pred = session.get(Prediction, entry.prediction_id) if entry.prediction_id else None
    if pred is None:
        raise ReviewError("this item's prediction was purged")
    vocab = tuple(session.scalar(select(Model.vocab).where(Model.version == pred.model_version)))
    probs = np.asarray(pred.probs, dtype=np.float64)
    order = np.argsort(-probs, kind="stable")
    claimed = session.scalars(
        select(Prediction.claimed_label).where(Prediction.image_sha256 == entry.image_sha256,
                                               text("predictions.claimed_label IS NOT NULL"))
        .group_by(Prediction.claimed_label).order_by(func.min(Prediction.created))).all()
    seen = session.scalar(select(func.count()).select_from(Prediction)
                          .where(Prediction.image_sha256 == entry.image_sha256))
    return QueueItem(
        item_id=entry.id, image_sha256=entry.image_sha256, prediction_id=pred.id, source=pred.source,
        created=pred.created, model_version=pred.model_version, vocab=vocab, predicted=pred.predicted,
        probs={vocab[i]: float(probs[i]) for i in order}, confidence=pred.confidence, margin=pred.margin,
        entropy=pred.entropy, loss=pred.loss, reasons=tuple(n for n in REASONS if getattr(entry, n)),
        claimed_labels=tuple(claimed), width=pred.width, height=pred.height, seen=int(seen or 0),
        required_decisions=entry.required_decisions, decisions_so_far=entry.n_decisions,
        lease_until=entry.lease_until,
    )


def open_counts(session: Session) -> dict[str, int]:
    """Open items per reason (each count reads only that reason's small partial index)."""
    out = {}
    for name in REASONS:
        out[name] = session.scalar(select(func.count()).select_from(Q).where(OPEN, text(f"queue_items.{name}")))
    return out


def claimed_count(session: Session, now: datetime) -> int:
    """Live claims (settled items never keep one), read from the partial index ix_queue_claimed."""
    return session.scalar(select(func.count()).select_from(Q).where(
        text("queue_items.claimed_by IS NOT NULL"), Q.lease_until > now))

