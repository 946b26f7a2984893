"""``ReviewDesk``: what a reviewer does. Claim the next item, decide it, undo, see the counts.

Authentication is the caller's job: every method takes a reviewer name the caller has already authenticated
(review.auth / ui.review_auth), and ``image_bytes`` must only be served to such a caller.
"""

from __future__ import annotations

from sqlalchemy import select

from review import decisions, queue, stats
from review.db import Model
from review.imagestore import check_sha
from review.store import ReviewStore
from review.types import DecisionResult, QueueItem, ReviewError


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
