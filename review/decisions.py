"""The append-only decision log: decide, undo, idempotency and conflicts.

Rules:
* An idempotency key records at most one decision; replaying it returns an equal ``DecisionResult``.
* First decision wins. Deciding an item that is already settled, or that you already decided (second-opinion
  items wait for a *different* reviewer), is a conflict: nothing is recorded, the result names who decided what.
* ``skip`` is logged too (who skipped what is useful), releases the claim and hides the item from that reviewer.
* ``undo`` never edits or deletes: it appends a decision that reverses the reviewer's latest one (``reverses_id``;
  UNIQUE, so racing undo clicks cannot reverse one decision twice), reopens the item and hands it back to them.
* ``previous_label`` is the label before the decision: the last reviewer label, else the label a user or the
  dataset claimed, else the model's prediction.
* Leases are enforced here, not trusted from the caller (the Review UI round-trips the item id through the
  browser, where it can be edited): while another reviewer's lease on an item is live, nobody else may decide
  or skip it (ReviewError, nothing recorded). Items without a claim, or whose lease has run out, may be decided
  by any reviewer: a lapsed lease protects no one, since ``claim_next`` would hand the item to anyone. So a
  reviewer whose lease expired while the item sat on their screen can still decide it, unless someone else
  has claimed it since. Replays of a recorded decision are answered before this check (a double press after the
  claim was released still gets its first answer). Second opinions: the first decision releases the claim and
  the second reviewer claims the item. ``undo`` hands an item back only when no one else holds a live claim.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session, aliased

from review.db import Decision, Model, Prediction, QueueEntry, ReviewerMark
from review.types import ACTIONS, DECISIVE, Conflict, DecisionResult, ReviewError, UnknownItem

_MESSAGES = {
    "confirm": "Confirmed.",
    "relabel": "Relabelled.",
    "out_of_domain": "Marked as out of domain.",
    "bad_image": "Marked as a bad image.",
    "skip": "Skipped.",
    "undo": "Undone: the item is open for review again.",
}


def result_of(d: Decision) -> DecisionResult:
    """The result of a recorded decision; built from the row alone, so a replay gets an equal result."""
    return DecisionResult(status="recorded", item_id=d.item_id, action=d.action, label=d.label,
                          previous_label=d.previous_label, decision_id=d.id, message=_MESSAGES[d.action])


def not_reversed():
    """WHERE clause: the decision has not been undone."""
    undo = aliased(Decision)
    return ~exists().where(undo.reverses_id == Decision.id)


def effective(session: Session, item_id: int) -> list[Decision]:
    """Decisive decisions on the item that have not been undone, oldest first."""
    return list(session.scalars(select(Decision).where(
        Decision.item_id == item_id, Decision.action.in_(DECISIVE), not_reversed()).order_by(Decision.id)))


def _lock_item(session: Session, item_id: int) -> QueueEntry:
    # FOR UPDATE serialises deciders of one item on PostgreSQL; SQLite is already serialised by BEGIN IMMEDIATE.
    entry = session.scalar(select(QueueEntry).where(QueueEntry.id == item_id).with_for_update()
                           .execution_options(populate_existing=True))
    if entry is None:
        raise UnknownItem(f"no queue item {item_id}")
    return entry


def _replay(session: Session, key: str, reviewer: str, item_id: int | None, action: str) -> DecisionResult | None:
    d = session.scalar(select(Decision).where(Decision.idempotency_key == key))
    if d is None:
        return None
    if d.reviewer != reviewer or d.action != action or (item_id is not None and d.item_id != item_id):
        raise ReviewError("this idempotency key was already used for a different decision")
    return result_of(d)


def refresh(session: Session, entry: QueueEntry) -> list[Decision]:
    """Recompute the item's summary columns from the log (the log is the truth; these are a cache)."""
    eff = effective(session, entry.id)
    entry.n_decisions = len(eff)
    entry.label = eff[-1].label if eff else None
    entry.outcome = eff[-1].action if eff else None
    if entry.status != "purged":  # its image is gone: nothing left to review, whatever the log says
        entry.status = "done" if len(eff) >= entry.required_decisions else "open"
    return eff


def _label_before(session: Session, entry: QueueEntry) -> str | None:
    if entry.n_decisions:
        return entry.label
    pred = session.get(Prediction, entry.prediction_id) if entry.prediction_id else None
    return (pred.claimed_label or pred.predicted) if pred else entry.predicted


def _check_label(session: Session, entry: QueueEntry, action: str, label: str | None) -> str | None:
    if action == "confirm":
        if label not in (None, entry.predicted):
            raise ReviewError(f"confirm keeps the predicted label {entry.predicted!r}; use relabel for {label!r}")
        return entry.predicted
    if action == "relabel":
        vocab = session.scalar(select(Model.vocab).where(Model.version == entry.model_version)) or []
        if label not in vocab:
            raise ReviewError(f"{label!r} is not one of the model's classes")
        return label
    if label is not None:
        raise ReviewError(f"{action} takes no label")
    return None


def _check_lease(entry: QueueEntry, reviewer: str, now: datetime) -> None:
    held_by_other = entry.claimed_by not in (None, reviewer)
    if held_by_other and entry.lease_until is not None and entry.lease_until > now:
        raise ReviewError("Another reviewer is reviewing this item right now, so nothing was recorded. "
                          "Press Refresh for your own next item.")


def _mark(session: Session, item_id: int, reviewer: str, action: str) -> None:
    mark = session.get(ReviewerMark, (item_id, reviewer))
    if mark is None:
        session.add(ReviewerMark(item_id=item_id, reviewer=reviewer, action=action))
    else:
        mark.action = action


def decide(session: Session, *, reviewer: str, item_id: int, action: str, label: str | None, key: str,
           now: datetime) -> DecisionResult:
    if action not in ACTIONS:
        raise ReviewError(f"unknown action {action!r}; choose one of {', '.join(sorted(ACTIONS))}")
    if not key:
        raise ReviewError("an idempotency key is required")
    entry = _lock_item(session, item_id)  # lock first: a racing duplicate waits here, then sees the first key
    replay = _replay(session, key, reviewer, item_id, action)
    if replay is not None:
        return replay
    _check_lease(entry, reviewer, now)
    if entry.status == "purged":
        raise ReviewError("this item's image was purged (retention period); there is nothing left to review")
    label = _check_label(session, entry, action, label)
    eff = effective(session, item_id)
    mine = [d for d in eff if d.reviewer == reviewer]
    if mine or entry.status != "open":
        others = mine or eff
        who = "You" if mine else ", ".join(sorted({d.reviewer for d in others})) or "another process"
        return DecisionResult(
            status="conflict", item_id=item_id, action=action, label=label,
            message=f"{who} already decided this item; nothing was recorded (use Undo to change your decision).",
            conflicts=tuple(Conflict(d.reviewer, d.action, d.label, d.created) for d in others))
    d = Decision(item_id=item_id, reviewer=reviewer, created=now, action=action, label=label,
                 previous_label=_label_before(session, entry), model_version=entry.model_version,
                 idempotency_key=key)
    session.add(d)
    _mark(session, item_id, reviewer, action)
    session.flush()
    if action in DECISIVE:
        refresh(session, entry)
    if entry.status != "open" or entry.claimed_by == reviewer:
        entry.claimed_by, entry.lease_until = None, None
    session.flush()
    return result_of(d)


def undo(session: Session, *, reviewer: str, key: str | None, now: datetime, lease_s: float) -> DecisionResult:
    """Reverse the reviewer's latest decision that is not yet reversed (repeat to walk further back)."""
    if key is not None:
        replay = _replay(session, key, reviewer, None, "undo")
        if replay is not None:
            return replay
    for _ in range(3):  # PostgreSQL: another undo may reverse our target while we wait for the item lock
        target = session.scalar(select(Decision).where(Decision.reviewer == reviewer, Decision.action != "undo",
                                                       not_reversed()).order_by(Decision.id.desc()).limit(1))
        if target is None:
            return DecisionResult(status="nothing_to_undo", item_id=None, action="undo",
                                  message="Nothing to undo.")
        entry = _lock_item(session, target.item_id)
        if key is not None and (replay := _replay(session, key, reviewer, None, "undo")) is not None:
            return replay
        still = session.scalar(select(Decision.id).where(Decision.id == target.id, not_reversed()))
        if still is not None:
            break
    else:
        raise ReviewError("undo raced with other undos; try again")
    d = Decision(item_id=entry.id, reviewer=reviewer, created=now, action="undo", label=target.previous_label,
                 previous_label=target.label, model_version=entry.model_version,
                 idempotency_key=key or f"undo:{uuid.uuid4().hex}", reverses_id=target.id)
    session.add(d)
    session.execute(delete(ReviewerMark).where(ReviewerMark.item_id == entry.id, ReviewerMark.reviewer == reviewer))
    session.flush()
    refresh(session, entry)
    someone_else = entry.claimed_by not in (None, reviewer) and entry.lease_until and entry.lease_until > now
    if entry.status == "open" and not someone_else:  # hand it back, but never take it from a live claim
        entry.claimed_by, entry.lease_until = reviewer, now + timedelta(seconds=lease_s)
    session.flush()
    return result_of(d)
