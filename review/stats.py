"""Counts for the Review tab's progress line and for monitoring."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from review.db import Decision, Prediction, QueueEntry
from review.decisions import not_reversed
from review.queue import claimed_count, open_counts
from review.types import DECISIVE, EXCLUDING

Q = QueueEntry
SECOND = text("queue_items.required_decisions >= 2")  # literal: matches the partial index ix_queue_second


def counts(session: Session, now: datetime) -> dict:
    by_status = dict(session.execute(select(Q.status, func.count()).group_by(Q.status)).all())
    live = (Decision.action.not_in(("undo",)), not_reversed())
    by_action = dict(session.execute(select(Decision.action, func.count()).where(*live)
                                     .group_by(Decision.action)).all())
    by_reviewer = dict(session.execute(select(Decision.reviewer, func.count())
                                       .where(*live, Decision.action != "skip").group_by(Decision.reviewer)).all())
    undos = session.scalar(select(func.count()).select_from(Decision).where(Decision.action == "undo"))
    return {
        "predictions": session.scalar(select(func.count()).select_from(Prediction)),
        "queue_open": by_status.get("open", 0),
        "queue_claimed": claimed_count(session, now),
        "queue_done": by_status.get("done", 0),
        "queue_purged": by_status.get("purged", 0),
        "open_by_reason": open_counts(session),
        "decisions": {a: by_action.get(a, 0) for a in ("confirm", "relabel", "out_of_domain", "bad_image", "skip")},
        "undos": undos,
        "by_reviewer": by_reviewer,
        "second_opinion": second_opinion(session),
        "audit": audit_accuracy(session),
    }


def second_opinion(session: Session) -> dict:
    """Agreement between the two reviewers of each settled second-opinion item (same action and label)."""
    rows = session.execute(
        select(Decision.item_id, Decision.action, Decision.label)
        .join(Q, Q.id == Decision.item_id)
        .where(SECOND, Q.status == "done", Decision.action.in_(DECISIVE), not_reversed())).all()
    per_item: dict[int, set] = {}
    for item_id, action, label in rows:
        per_item.setdefault(item_id, set()).add(action if action in EXCLUDING else label)
    pairs = len(per_item)
    agreed = sum(1 for v in per_item.values() if len(v) == 1)
    pending = session.scalar(select(func.count()).select_from(Q).where(SECOND, Q.status == "open",
                                                                       Q.n_decisions >= 1))
    return {"pairs": pairs, "agreed": agreed, "agreement": agreed / pairs if pairs else None,
            "awaiting_second": pending}


def audit_accuracy(session: Session) -> dict:
    """Accuracy on the uniform audit sample: the unbiased estimate (out-of-domain/bad images left out)."""
    rows = session.execute(select(Q.label, Q.predicted).where(Q.audit, Q.status == "done",
                                                              Q.outcome.in_(("confirm", "relabel")))).all()
    correct = sum(1 for label, predicted in rows if label == predicted)
    return {"reviewed": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None}
