"""Names, value objects and errors shared by the review package and its callers (UI, REST, CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# Why an item is queued. Bit flags in the pure scoring layer (review.scoring), one boolean column each in the
# database (so each reason gets its own small partial index and filtering by reason stays fast at 1e6 rows).
LOW_CONFIDENCE = 1
HIGH_LOSS = 2
AUDIT = 4
DATASET = 8
USER_FLAGGED = 16
UNFAMILIAR = 32  # the input looks unlike the model's reference images (model/unfamiliar.py)
CLAIMED_OUT_OF_DOMAIN = 64  # a user said "none of these" / "not a <domain>"
REASONS: dict[str, int] = {
    # listed in queue order (see review.scoring.queue_priority)
    "high_loss": HIGH_LOSS,
    "dataset": DATASET,
    "user_flagged": USER_FLAGGED,
    "claimed_out_of_domain": CLAIMED_OUT_OF_DOMAIN,
    "audit": AUDIT,
    "unfamiliar": UNFAMILIAR,
    "low_confidence": LOW_CONFIDENCE,
}
REASON_TEXT: dict[str, str] = {
    "high_loss": "The model confidently contradicts the label a user gave",
    "dataset": "Dataset audit: the model confidently contradicts the dataset's label",
    "user_flagged": "A user said the prediction is wrong",
    "claimed_out_of_domain": "A user said the image shows none of the model's classes (out of domain)",
    "audit": "Random audit sample (checks the model's accuracy without bias)",
    "unfamiliar": "The image looks unlike the ones the model was trained on (its answer is probably meaningless)",
    "low_confidence": "The model is unsure (low top probability or small margin)",
}

SOURCES = frozenset({"upload", "webcam", "sketch", "stream", "api", "dataset", "rescore"})
ACTIONS = frozenset({"confirm", "relabel", "out_of_domain", "bad_image", "skip"})
# Actions that settle an item (count towards its required decisions); skip and undo do not.
DECISIVE = frozenset({"confirm", "relabel", "out_of_domain", "bad_image"})
EXCLUDING = frozenset({"out_of_domain", "bad_image"})


def reason_names(mask: int) -> tuple[str, ...]:
    return tuple(name for name, bit in REASONS.items() if mask & bit)


class ReviewError(ValueError):
    """A caller or user mistake; ``args[0]`` is a message that is safe to show."""


class UnknownItem(ReviewError):
    pass


class UnknownPrediction(ReviewError):
    pass


@dataclass(frozen=True)
class QueueItem:
    """What a reviewer sees: one queued image and the prediction that queued it."""

    item_id: int
    image_sha256: str
    prediction_id: str
    source: str
    created: datetime
    model_version: str
    vocab: tuple[str, ...]
    predicted: str
    probs: dict[str, float]  # every class, most probable first (the shape gr.Label takes)
    confidence: float
    margin: float
    entropy: float
    loss: float | None
    reasons: tuple[str, ...]  # keys of REASONS, most important first; REASON_TEXT explains them
    claimed_labels: tuple[str, ...]  # labels users or the imported dataset gave this image (any prediction of it)
    width: int | None
    height: int | None
    seen: int  # how many logged predictions share this exact image
    required_decisions: int  # 2 when the item was drawn for a second opinion
    decisions_so_far: int
    lease_until: datetime


@dataclass(frozen=True)
class Conflict:
    reviewer: str
    action: str
    label: str | None
    time: datetime


@dataclass(frozen=True)
class DecisionResult:
    """Outcome of decide()/undo(). Replaying the same idempotency key returns an equal result."""

    status: str  # "recorded" | "conflict" | "nothing_to_undo"
    item_id: int | None
    action: str
    label: str | None = None
    previous_label: str | None = None
    decision_id: int | None = None
    message: str = ""
    conflicts: tuple[Conflict, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "recorded"
