"""Pure, vectorised scores (like cleanlab's rank.py): arrays in, arrays out, no I/O, no settings object.

Queue order (``queue_priority``), most urgent first; an item with several reasons takes its best tier:

1. **high loss / dataset / user flagged / user says out of domain** (priority in [3, 4)): a confident contradiction of a known label is the
   most likely error and the cheapest to fix; ordered by loss, highest first. A user's bare "wrong" (no label
   given) has no exact loss; it ranks by its lower bound ``-log(1 - confidence)``: the true class can have at
   most the probability mass the prediction did not take.
2. **audit** (priority 2): the uniform random sample must be reviewed completely to give an unbiased accuracy
   estimate, so it outranks the (much larger) low-confidence backlog; first come, first served (ties -> by id).
3. **low confidence / unfamiliar input** (priority in [1, 2)): smallest margin first (the model is the most torn).
   An unfamiliar input (model/unfamiliar.py) is queued here: reviewers confirm it is out of domain (or not).

Not queued: priority 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from review.types import AUDIT, CLAIMED_OUT_OF_DOMAIN, DATASET, HIGH_LOSS, LOW_CONFIDENCE, UNFAMILIAR, USER_FLAGGED

_EPS = 1e-12
_TIER3 = HIGH_LOSS | DATASET | USER_FLAGGED | CLAIMED_OUT_OF_DOMAIN
_TIER1 = LOW_CONFIDENCE | UNFAMILIAR


def _as_2d(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"probs must have shape (N, C) with C >= 1, got {p.shape}")
    return p


def confidence(probs) -> np.ndarray:
    """Top probability per row."""
    return _as_2d(probs).max(axis=1)


def margin(probs) -> np.ndarray:
    """Top probability minus the runner-up (the top probability itself when there is one class)."""
    p = _as_2d(probs)
    if p.shape[1] == 1:
        return p[:, 0].copy()
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(probs) -> np.ndarray:
    """Shannon entropy in nats (0 log 0 = 0)."""
    p = _as_2d(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=1)


def loss(labels_idx, probs) -> np.ndarray:
    """Cross-entropy ``-log p[label]`` per row; NaN where the label is unknown (index < 0)."""
    p = _as_2d(probs)
    idx = np.asarray(labels_idx, dtype=np.int64)
    if idx.shape != (p.shape[0],):
        raise ValueError(f"labels_idx must have shape ({p.shape[0]},), got {idx.shape}")
    if (idx >= p.shape[1]).any():
        raise ValueError("label index out of range")
    known = idx >= 0
    picked = p[np.arange(p.shape[0]), np.where(known, idx, 0)]
    return np.where(known, -np.log(np.clip(picked, _EPS, 1.0)), np.nan)


def unit_hash(keys: Iterable[str], salt: str = "") -> np.ndarray:
    """Deterministic uniform [0, 1) per key (sha256): the same on every replica and in every test run."""
    out = [int.from_bytes(hashlib.sha256((salt + k).encode()).digest()[:8], "big") for k in keys]
    return np.asarray(out, dtype=np.float64) / 2.0**64


def is_audit(prediction_ids: Iterable[str], rate: float) -> np.ndarray:
    """The audit sample: a uniform share ``rate`` of ALL predictions, whatever their confidence."""
    return unit_hash(prediction_ids, "audit:") < rate


def needs_second_opinion(image_shas: Iterable[str], rate: float) -> np.ndarray:
    return unit_hash(image_shas, "second:") < rate


def review_reasons(conf, marg, loss_, audit, *, low_confidence: float, low_margin: float, high_loss: float,
                   dataset=None, flagged=None, unfamiliar=None) -> np.ndarray:
    """Bit mask of reasons per row (review.types flags).

    ``loss_`` is NaN where no label is known. Rows with ``dataset`` True come from a dataset import: they are
    queued only for a high loss against the dataset's own label (reason DATASET): that audit is about the
    labels, and neither confidence nor the traffic audit sample applies to them.
    """
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.shape[0]
    marg = np.asarray(marg, dtype=np.float64)
    lo = np.asarray(loss_, dtype=np.float64)
    ds = np.zeros(n, bool) if dataset is None else np.asarray(dataset, bool)
    fl = np.zeros(n, bool) if flagged is None else np.asarray(flagged, bool)
    odd = np.zeros(n, bool) if unfamiliar is None else np.asarray(unfamiliar, bool)
    with np.errstate(invalid="ignore"):
        lossy = np.nan_to_num(lo, nan=-np.inf) > high_loss
    unsure = (conf < low_confidence) | (marg < low_margin)
    traffic = np.where(unsure, LOW_CONFIDENCE, 0) | np.where(lossy, HIGH_LOSS, 0) | np.where(
        np.asarray(audit, bool), AUDIT, 0) | np.where(fl, USER_FLAGGED, 0) | np.where(odd, UNFAMILIAR, 0)
    return np.where(ds, np.where(lossy, DATASET, 0), traffic).astype(np.int64)


def queue_priority(reasons, conf, marg, loss_) -> np.ndarray:
    """Higher = reviewed sooner; the tiers are described in the module docstring."""
    r = np.asarray(reasons, dtype=np.int64)
    conf = np.asarray(conf, dtype=np.float64)
    marg = np.clip(np.asarray(marg, dtype=np.float64), 0.0, 1.0)
    lo = np.asarray(loss_, dtype=np.float64)
    flagged_bound = -np.log(np.clip(1.0 - conf, _EPS, 1.0))
    known = np.where(np.isnan(lo), -np.inf, lo)
    eff = np.where(r & (USER_FLAGGED | CLAIMED_OUT_OF_DOMAIN), np.maximum(known, flagged_bound), known)
    eff = np.clip(np.where(np.isfinite(eff), eff, 0.0), 0.0, None)
    tier3 = 3.0 + eff / (1.0 + eff)  # monotone in loss, stays below 4
    tier1 = 1.0 + (1.0 - marg) * 0.999  # stays below 2
    return np.select([(r & _TIER3) != 0, (r & AUDIT) != 0, (r & _TIER1) != 0], [tier3, 2.0, tier1], 0.0)


# --- label quality (dataset audits) ------------------------------------------------------------------------------
# Scores of how well each item's given label agrees with (out-of-fold) predicted probabilities, as in cleanlab's
# rank.py and count.py: arrays in, arrays out. Lower quality = more likely a label error. README "Close the loop"
# says which one the queue uses and why (bench/label_audit.py measured them side by side).

LABEL_QUALITY_METHODS = ("self_confidence", "normalized_margin", "adjusted_self_confidence")


def _labels_probs(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    p = _as_2d(probs)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {y.shape}")
    if ((y < 0) | (y >= p.shape[1])).any():
        raise ValueError("label index out of range")
    return y, p


def self_confidence(labels, probs) -> np.ndarray:
    """The probability given to the item's own label."""
    y, p = _labels_probs(labels, probs)
    return p[np.arange(len(y)), y]


def normalized_margin(labels, probs) -> np.ndarray:
    """(p[label] - the largest other probability + 1) / 2, in [0, 1]: how far the label is ahead of its best rival."""
    y, p = _labels_probs(labels, probs)
    own = p[np.arange(len(y)), y]
    if p.shape[1] == 1:
        return (own + 1.0) / 2.0
    others = p.copy()
    others[np.arange(len(y)), y] = -np.inf
    return (own - others.max(axis=1) + 1.0) / 2.0


def confident_thresholds(labels, probs) -> np.ndarray:
    """Per class k: the mean probability of k over the items labelled k (cleanlab's per-class thresholds).
    A class nobody is labelled with gets +inf: no item is ever confidently counted as it."""
    y, p = _labels_probs(labels, probs)
    counts = np.bincount(y, minlength=p.shape[1]).astype(np.float64)
    sums = np.zeros(p.shape[1])
    np.add.at(sums, y, p[np.arange(len(y)), y])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.inf)


def confident_guess(labels, probs, thresholds=None) -> np.ndarray:
    """Confident learning's guess of each item's true class, or -1 when no class is confident.

    A class j is confident for an item when p[j] reaches its threshold t_j; with one such class that is the
    guess, with several the most probable one (cleanlab's compute_confident_joint). Unlike cleanlab, a class
    nobody is labelled with (infinite threshold) gets the mean of the other thresholds: a small import of new
    data may hold no correctly labelled example of the very class its mislabelled items belong to."""
    y, p = _labels_probs(labels, probs)
    t = confident_thresholds(y, p) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    finite = np.isfinite(t)
    t = np.where(finite, t, t[finite].mean() if finite.any() else 1.0)
    confident = p >= t - 1e-6
    n = confident.sum(axis=1)
    guess = np.where(n > 1, p.argmax(axis=1), confident.argmax(axis=1))
    return np.where(n > 0, guess, -1)


def likely_label_issues(labels, probs, thresholds=None) -> np.ndarray:
    """Confident learning (cleanlab's filter_by="confident_learning"): the item's confident guess is another class.
    No fixed threshold: each class's bar is how confident the model is, on average, about that class's own items."""
    y, _ = _labels_probs(labels, probs)
    guess = confident_guess(labels, probs, thresholds)
    return (guess >= 0) & (guess != y)


def label_issue_candidates(labels, probs, thresholds=None) -> np.ndarray:
    """What a dataset audit queues: the model prefers another class (argmax != label) or confident learning flags
    the label. Measured on digits with 10 % flipped labels (bench/label_audit.py): confident learning alone missed
    13-16 % of the errors; the out-of-fold argmax missed none while queueing about 1.1x as many items as there were
    errors. Labels the out-of-fold model agrees with were, in that measurement, all correct."""
    y, p = _labels_probs(labels, probs)
    return (p.argmax(axis=1) != y) | likely_label_issues(y, p, thresholds)


def adjusted_self_confidence(labels, probs, thresholds=None) -> np.ndarray:
    """Self-confidence after subtracting each class's threshold and renormalising (cleanlab's adjust_pred_probs):
    classes the model is generally less sure about are not over-suspected."""
    y, p = _labels_probs(labels, probs)
    t = confident_thresholds(y, p) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    t = np.where(np.isfinite(t), t, 0.0)
    adj = p - t[None, :]
    adj = adj - adj.min(axis=1, keepdims=True)
    total = adj.sum(axis=1, keepdims=True)
    adj = np.where(total > 0, adj / np.where(total > 0, total, 1.0), 1.0 / p.shape[1])
    return adj[np.arange(len(y)), y]


def label_quality(labels, probs, method: str = "self_confidence") -> np.ndarray:
    """Label quality in [0, 1] by ``method`` (LABEL_QUALITY_METHODS); lower = more likely mislabelled."""
    if method == "self_confidence":
        return self_confidence(labels, probs)
    if method == "normalized_margin":
        return normalized_margin(labels, probs)
    if method == "adjusted_self_confidence":
        return adjusted_self_confidence(labels, probs)
    raise ValueError(f"unknown label quality method {method!r}; choose one of {', '.join(LABEL_QUALITY_METHODS)}")


def label_issue_priority(quality) -> np.ndarray:
    """Queue priority of dataset-audit items: queue_priority's dataset tier, ordered by label quality (lowest
    first). The quality q is read as the loss -log(q), so with self-confidence it IS the item's loss against its
    label, and audit items interleave with high-loss traffic exactly as their losses say."""
    q = np.clip(np.asarray(quality, dtype=np.float64), _EPS, 1.0)
    n = q.shape[0]
    return queue_priority(np.full(n, DATASET), np.ones(n), np.ones(n), -np.log(q))
