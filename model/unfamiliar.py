""""I don't know": flag inputs unlike the images a model version was checked on (issue 9 §1).

The score is the **Mahalanobis distance** of the classifier's features (model/graph.py: the input of its last
Linear) to the nearest class mean, with one covariance shared by the classes (Lee et al. 2018), fitted on the
version's reference images (model/calibrate.py). Chosen by measuring (bench/unfamiliar_bench.py, bench/README.md):
on the demo it flags nearly every photo, crop, blank, noise and text image at ~3 % of held-out digits, where max softmax
and energy miss most of them (a blank page or noise gets "1" or "8" with 86-99 %: a softmax is sure far from its
data) and k-nearest-neighbour distance is as good but needs the reference features themselves (~1 MB for the demo,
and a scan per request) instead of C means and a D x D matrix.

    score(x) = min_c (f(x) - mu_c)^T P (f(x) - mu_c),   P = (shrunk shared covariance)^-1 = W W^T
             = min_c || f(x) W - mu_c W ||^2

Stored as ``W`` and ``mu_c W`` (the whitened means), so a request costs one (D x D) product and a (C x D) distance:
microseconds next to a forward pass. The covariance is shrunk towards its diagonal mean (``SHRINK``): a user's
calibration folder may hold fewer images than the features have dimensions.

Threshold: the ``QUANTILE`` (95 %) of *out-of-fold* scores of the reference images (K folds: each fold scored by
a detector fitted on the others; images of one source, e.g. the renderings of one digit, in one fold), so it is
what a held-out in-distribution image reaches, not the optimistic in-sample score: about 5 % of familiar inputs
are flagged by construction (3 % of new digits measured on the demo). Stored with the detector, with ``reference_rate`` (the share of reference images over it, out of
fold: what the drift alarm compares the live unfamiliar rate with).

No features (a model without a Linear head), no reference, or a reference without this section: the flag is
unknown (None), never an error.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

NAME = "unfamiliar"
METHOD = "mahalanobis"
QUANTILE = 0.95  # the false-alarm budget: 5 % of familiar inputs at most
SHRINK = 0.1  # share of the covariance replaced by its mean variance times I
FOLDS = 5
MIN_IMAGES = 6  # fewer reference images cannot place a threshold
MESSAGE = ("This doesn't look like the images this model was trained on; its answer is probably meaningless.")


# --- arrays in JSON ------------------------------------------------------------------------------------------
def pack(a: np.ndarray) -> dict:
    """float32 little-endian, base64: exact and ~4x smaller than a JSON list of decimals."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "f4": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack(d: dict) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(d["f4"]), dtype="<f4")
    return a.reshape(d["shape"]).astype(np.float32)


# --- scores (pure, vectorised) ---------------------------------------------------------------------------------
def mahalanobis(features: np.ndarray, whiten: np.ndarray, means_w: np.ndarray) -> np.ndarray:
    """(N,) squared distance to the nearest class mean, for features (N, D), ``W`` (D, D), ``mu W`` (C, D)."""
    z = np.asarray(features, dtype=np.float32) @ whiten
    # ||z - m||^2 = |z|^2 - 2 z.m + |m|^2, one matrix product for every class
    d = (z * z).sum(axis=1, keepdims=True) - 2.0 * (z @ means_w.T) + (means_w * means_w).sum(axis=1)[None, :]
    return np.maximum(d.min(axis=1), 0.0)


def max_softmax(probs: np.ndarray) -> np.ndarray:
    """1 - top probability (higher = more unfamiliar), the baseline of Hendrycks & Gimpel."""
    return 1.0 - np.asarray(probs, dtype=np.float64).max(axis=1)


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits) (Liu et al. 2020; higher = more unfamiliar). Needs logits, not probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1)
    return -(m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def knn_distance(features: np.ndarray, reference: np.ndarray, k: int = 1) -> np.ndarray:
    """Distance of L2-normalised features to their k-th nearest reference feature (Sun et al. 2022)."""
    def norm(a):
        a = np.asarray(a, dtype=np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sim = norm(features) @ norm(reference).T
    kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))


# --- fitting -----------------------------------------------------------------------------------------------------
def fit_gaussian(features: np.ndarray, classes: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, mu W) from features (N, D) and class indices (N,): class means, one shrunk shared covariance."""
    f = np.asarray(features, dtype=np.float64)
    classes = np.asarray(classes, dtype=np.int64)
    present = [c for c in range(n_classes) if (classes == c).any()]
    means = np.stack([f[classes == c].mean(axis=0) for c in present])
    centred = f - means[np.searchsorted(present, classes)]
    cov = centred.T @ centred / max(len(f) - len(present), 1)
    scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    cov = (1.0 - SHRINK) * cov + SHRINK * scale * np.eye(cov.shape[0])
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs / np.sqrt(np.maximum(vals, scale * 1e-6))[None, :]  # W W^T = cov^-1
    return whiten.astype(np.float32), (means @ whiten).astype(np.float32)


def fold_of(n: int, folds: int, groups=None) -> np.ndarray:
    """A deterministic interleaved assignment (reference items come in a stable order); images of one group (e.g.
    renderings of one digit) share a fold, else the fold's detector has seen their siblings and the threshold
    comes out optimistic (measured on the demo: 6.6 % of new digits flagged at a 97.5 % threshold, 1.4 % grouped)."""
    if groups is None:
        return np.arange(n) % folds
    return np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1) % folds


def out_of_fold_scores(features: np.ndarray, classes: np.ndarray, n_classes: int, folds: int = FOLDS,
                       groups=None) -> np.ndarray:
    fold = fold_of(len(features), folds, groups)
    out = np.empty(len(features), dtype=np.float64)
    for k in range(folds):
        hold = fold == k
        if not hold.any() or hold.all():
            continue
        w, m = fit_gaussian(features[~hold], classes[~hold], n_classes)
        out[hold] = mahalanobis(features[hold], w, m)
    return out


def fit(features: np.ndarray, classes: np.ndarray, n_classes: int, quantile: float = QUANTILE, groups=None) -> dict:
    """The reference file's ``"unfamiliar"`` section. ``classes``: the model's own predicted class per image
    (labels may be missing; the model's answer is what its features cluster by). ``groups``: see ``fold_of``."""
    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if n < MIN_IMAGES:
        raise ValueError(f"{n} reference images with features; the unfamiliar-input detector needs {MIN_IMAGES}")
    oof = out_of_fold_scores(features, classes, n_classes, folds=min(FOLDS, n), groups=groups)
    threshold = float(np.quantile(oof, quantile))
    whiten, means_w = fit_gaussian(features, classes, n_classes)
    return {"method": METHOD, "n": n, "dim": int(features.shape[1]), "quantile": quantile, "shrink": SHRINK,
            "folds": min(FOLDS, n), "threshold": threshold, "reference_rate": float((oof > threshold).mean()),
            "score_q50_95_99": [round(float(x), 3) for x in np.quantile(oof, (0.5, 0.95, 0.99))],
            "whiten": pack(whiten), "means_w": pack(means_w)}


@dataclass
class UnfamiliarSection:
    """model.reference Section: collects the reference images' features and the model's answers, then fits."""

    n_classes: int
    name: str = NAME
    _features: list = field(default_factory=list)
    _classes: list = field(default_factory=list)
    _groups: list = field(default_factory=list)
    _missing: int = 0

    def add(self, batch) -> None:
        feats = batch.features
        if feats is None:
            self._missing += len(batch.images)
            return
        self._features.append(np.asarray(feats, dtype=np.float32))
        self._classes += batch.probs.argmax(axis=1).tolist()
        # no group: each image its own (a string key, so given groups never collide with these)
        start = len(self._groups)
        self._groups += [f"#{start + k}" if batch.groups is None or g is None else f"g{g}"
                         for k, g in enumerate(batch.groups or [None] * len(feats))]

    def finish(self) -> dict:
        if not self._features:
            return {"method": None, "reference_rate": None,
                    "note": "the model has no features output: unfamiliar inputs are not flagged"}
        try:
            return fit(np.concatenate(self._features), np.asarray(self._classes), self.n_classes,
                       groups=self._groups)
        except ValueError as e:
            return {"method": None, "reference_rate": None, "note": str(e)}


# --- serving -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detector:
    """One model version's detector, loaded once from its reference file (immutable: shared by every request)."""

    whiten: np.ndarray
    means_w: np.ndarray
    threshold: float

    @classmethod
    def from_section(cls, section: dict | None) -> Detector | None:
        if not section or section.get("method") != METHOD:
            return None
        try:
            d = cls(unpack(section["whiten"]), unpack(section["means_w"]), float(section["threshold"]))
        except (KeyError, TypeError, ValueError) as e:
            log.error("the reference's unfamiliar section is unreadable (%s): inputs are not flagged", e)
            return None
        if d.whiten.ndim != 2 or d.means_w.shape[1:] != d.whiten.shape[1:]:
            log.error("the reference's unfamiliar section has inconsistent shapes: inputs are not flagged")
            return None
        return d

    @property
    def dim(self) -> int:
        return self.whiten.shape[0]

    def scores(self, features: np.ndarray) -> np.ndarray:
        return mahalanobis(features, self.whiten, self.means_w)

    def flags(self, features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
        """(flags (N,) bool, scores (N,)), or None when these features cannot be scored (none, other size)."""
        if features is None:
            return None
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[1] != self.dim:
            return None
        s = self.scores(f)
        return s > self.threshold, s
