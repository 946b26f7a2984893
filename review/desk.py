"""``ReviewDesk``: what a reviewer does. Claim the next item, decide it, undo, see the counts.

Authentication is the caller's job: every method takes a reviewer name the caller has already authenticated
(review.auth / ui.review_auth), and ``image_bytes`` must only be served to such a caller.
"""

from __future__ import annotations

from sqlalchemy import exists, func, select, text

from review import decisions, queue, stats
from review.db import Decision, Model, QueueEntry, ReviewerMark
from review.imagestore import check_sha
from review.store import ReviewStore
from review.types import DECISIVE, DecisionResult, QueueItem, ReviewError

DONE = text("queue_items.status = 'done'")  # literal, like queue.OPEN, so the (status, ...) indexes apply


class ReviewDesk:
    def __init__(self, store: ReviewStore):
        self.store = store
        self.lease_s = store.settings.claim_lease_s

    def next_item(self, reviewer: str, *, reason: str | None = None, predicted: str | None = None,
                  model_version: str | None = None) -> QueueItem | None:
        _check_reviewer(reviewer)

        def fn(session) -> QueueItem | None:
            entry = queue.claim_next(session, reviewer, now=self.store.clock(), lease_s=self.lease_s, reason=reason,
                                     predicted=predicted, model_version=model_version)
            return None if entry is None else queue.to_view(session, entry)

        return self.store.transaction(fn)

    def release(self, reviewer: str) -> int:
        """Give back the reviewer's claim (logout, tab closed)."""
        return self.store.transaction(lambda s: queue.release(s, reviewer))

    def decide(self, reviewer: str, item_id: int, *, action: str, label: str | None,
               idempotency_key: str) -> DecisionResult:
        _check_reviewer(reviewer)
        return self.store.transaction(
            lambda s: decisions.decide(s, reviewer=reviewer, item_id=item_id, action=action, label=label,
                                       key=idempotency_key, now=self.store.clock()),
            durable=True)

    def undo(self, reviewer: str, *, idempotency_key: str | None = None) -> DecisionResult:
        """Reverse the reviewer's latest decision; pass a key so a double click undoes only once."""
        _check_reviewer(reviewer)
        return self.store.transaction(
            lambda s: decisions.undo(s, reviewer=reviewer, key=idempotency_key, now=self.store.clock(),
                                     lease_s=self.lease_s),
            durable=True)

    def counts(self) -> dict:
        out = self.store.transaction(lambda s: stats.counts(s, self.store.clock()), read=True)
        out.update(self.store.log_status())
        return out

    def progress(self, reviewer: str, *, reason: str | None = None, predicted: str | None = None,
                 model_version: str | None = None) -> dict[str, int]:
        """The reviewer's own progress for their filters: ``left`` open items they may still be offered (not
        decided or skipped by them; ``held`` of those claimed by someone else right now), ``open`` all open items,
        ``total`` items open or done, and ``decided`` their decisions in force (any filter). Fresh on every call:
        it is the number the reviewer watches tick down."""
        _check_reviewer(reviewer)
        open_conds = queue.filters(reason=reason, predicted=predicted, model_version=model_version)
        extra = [c for c in open_conds if c is not queue.OPEN]
        Q = QueueEntry
        mine = exists().where(ReviewerMark.item_id == Q.id, ReviewerMark.reviewer == reviewer)

        def fn(s) -> dict[str, int]:
            # One pass over the open items for both counts (the NOT EXISTS probes the marks' primary key).
            open_now, left = s.execute(select(func.count(), func.count().filter(~mine)).select_from(Q)
                                       .where(*open_conds)).one()
            done = s.scalar(select(func.count()).select_from(Q).where(DONE, *extra))
            # Held by someone else right now: at most one live claim per reviewer, found through the small partial
            # index ix_queue_claimed (with the other terms in the same query SQLite scans the open items instead).
            claims = s.scalars(select(Q.id).where(text("queue_items.claimed_by IS NOT NULL"),
                                                  Q.claimed_by != reviewer, Q.lease_until > self.store.clock())).all()
            held = 0
            if claims:
                held = s.scalar(select(func.count()).select_from(Q).where(Q.id.in_(claims), *open_conds, ~mine))
            decided = s.scalar(select(func.count()).select_from(Decision).where(
                Decision.reviewer == reviewer, Decision.action.in_(DECISIVE), decisions.not_reversed()))
            return {"left": left, "open": open_now, "total": open_now + done, "held": held, "decided": decided}

        return self.store.transaction(fn, read=True)

    def model_versions(self) -> list[str]:
        return self.store.transaction(
            lambda s: list(s.scalars(select(Model.version).order_by(Model.first_seen))), read=True)

    def classes(self) -> list[str]:
        """Every class of every registered model, in first-seen order (for filters across versions)."""
        vocabs = self.store.transaction(
            lambda s: list(s.scalars(select(Model.vocab).order_by(Model.first_seen))), read=True)
        return list(dict.fromkeys(c for vocab in vocabs for c in vocab))

    def image_bytes(self, image_sha256: str) -> bytes:
        """Stored bytes of a queued image. Only for authenticated reviewers: the caller checks that."""
        return self.store.images.read(check_sha(image_sha256))


def _check_reviewer(reviewer: str) -> None:
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise ReviewError("a reviewer name is required")
