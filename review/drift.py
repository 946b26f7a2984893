"""Drift alarms: compare a window of live traffic with the serving version's reference (model/reference.py).

Pure functions (arrays in, numbers out, like review.scoring); review/monitor.py runs them in the background.

The statistic is the population stability index, PSI = sum_i (q_i - p_i) * ln(q_i / p_i) over bins (p: the
reference's shares, q: the window's), for every check alike:

* predicted-class shares (one bin per class), confidence (fixed bins), the unfamiliar rate (2 bins: flagged or
  not), brightness, resolution and aspect ratio (fixed bins), greyscale share (2 bins).

Why PSI and not chi-square or KS:
* one scale for categorical and binned continuous data, with a long-used reading (< 0.1 stable, 0.1-0.25 a shift
  worth a look, > 0.25 a major shift), so one threshold setting means the same thing for every check;
* it measures *how much* the distribution moved, not how sure we are that it moved: a chi-square or KS p-value
  turns any tiny, harmless difference into an alarm once the window is large, and KS is meant for continuous data
  (here: image sizes all 32 x 32, confidences exactly 1.0; ties everywhere).
PSI's weakness is sampling noise in small windows: under no drift it is about chi2(k-1) * (1/n + 1/N) (n window,
N reference, k bins), e.g. ~0.56 on average for a 100-class model with a 200-prediction window. So an alarm needs
BOTH a PSI above the threshold (the shift is large) AND above that noise's 99.9th percentile (``noise_floor``: the
shift is real). With 10 classes and 500 predictions the floor is ~0.06 and the threshold decides; with many classes
or a short window the floor does, so small samples do not cry wolf. Empty bins get a pseudo-count of 0.5
(Jeffreys), on both sides, so an absent class or an unseen resolution gives a large but finite PSI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.reference import EDGES, Reference, aspect, bin_counts, resolution

SMOOTHING = 0.5
ALPHA = 0.001  # the noise floor's false-alarm probability per check
_Z = {0.01: 2.3263, 0.001: 3.0902, 0.0001: 3.7190}  # upper normal quantiles

OK, DRIFT, INSUFFICIENT, UNKNOWN = "ok", "drift", "insufficient", "unknown"


def psi(reference_counts: Sequence[float], window_counts: Sequence[float], smoothing: float = SMOOTHING) -> float:
    """Population stability index between two histograms over the same bins (counts, not shares)."""
    p = np.asarray(reference_counts, dtype=np.float64) + smoothing
    q = np.asarray(window_counts, dtype=np.float64) + smoothing
    if p.shape != q.shape or p.size < 2:
        raise ValueError("psi needs two histograms with the same bins (at least 2)")
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def chi2_quantile(dof: int, alpha: float = ALPHA) -> float:
    """Upper ``alpha`` quantile of chi-square with ``dof`` degrees of freedom (Wilson-Hilferty; within ~1% from
    dof 3 on, and conservative below that)."""
    if dof < 1:
        return 0.0
    z = _Z[alpha]
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def noise_floor(bins: int, n_window: int, n_reference: int, alpha: float = ALPHA) -> float:
    """The PSI that pure sampling noise stays under with probability 1 - alpha (module docstring)."""
    if n_window <= 0 or n_reference <= 0:
        return math.inf
    return chi2_quantile(bins - 1, alpha) * (1.0 / n_window + 1.0 / n_reference)


@dataclass(frozen=True)
class Thresholds:
    classes: float = 0.25
    confidence: float = 0.25
    inputs: float = 0.25  # brightness, resolution, aspect, greyscale
    unfamiliar: float = 0.25
    min_window: int = 200

    @classmethod
    def from_settings(cls, settings) -> Thresholds:
        return cls(settings.drift_psi_classes, settings.drift_psi_confidence, settings.drift_psi_inputs,
                   settings.drift_psi_unfamiliar, settings.drift_min_window)

    def of(self, check: str) -> float:
        return {"classes": self.classes, "confidence": self.confidence, "unfamiliar": self.unfamiliar}.get(
            check, self.inputs)


@dataclass(frozen=True)
class Window:
    """The live traffic to check: one entry per prediction (NaN / None where a statistic is unknown)."""

    predicted: Sequence[str]
    confidence: np.ndarray
    width: np.ndarray
    height: np.ndarray
    brightness: np.ndarray
    saturation: np.ndarray
    unfamiliar: np.ndarray | None = None  # 1.0 flagged, 0.0 not, NaN unknown; None: nobody flags inputs yet

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> Window:
        names = ("predicted", "confidence", "width", "height", "brightness", "saturation", "unfamiliar")
        return cls.from_columns({n: [r.get(n) for r in rows] for n in names})

    @classmethod
    def from_columns(cls, cols: dict[str, Sequence]) -> Window:
        """Columns as read from the database (None where unknown; "unfamiliar" may be absent)."""
        def col(name):
            return np.array(cols[name], dtype=np.float64)  # None -> NaN

        flags = cols.get("unfamiliar")
        unfamiliar = col("unfamiliar") if flags is not None and any(f is not None for f in flags) else None
        return cls(list(cols["predicted"]), col("confidence"), col("width"), col("height"), col("brightness"),
                   col("saturation"), unfamiliar)

    def __len__(self) -> int:
        return len(self.predicted)


@dataclass(frozen=True)
class Check:
    name: str  # classes | confidence | unfamiliar | brightness | resolution | aspect | greyscale
    status: str  # OK | DRIFT | INSUFFICIENT (window too small) | UNKNOWN (no reference or no values)
    psi: float | None
    threshold: float
    floor: float | None
    n: int  # window values that went into it
    bins: tuple[str, ...] = ()
    reference_shares: tuple[float, ...] = ()
    window_shares: tuple[float, ...] = ()
    note: str = field(default="")

    def as_dict(self) -> dict:
        return {"status": self.status, "psi": None if self.psi is None else round(self.psi, 4),
                "threshold": self.threshold, "n": self.n}


def check(name: str, ref_counts, win_counts, bins: Sequence[str], th: Thresholds) -> Check:
    ref = np.asarray(ref_counts, dtype=np.float64)
    win = np.asarray(win_counts, dtype=np.float64)
    n, n_ref = int(win.sum()), int(ref.sum())
    threshold = th.of(name)
    ref_sh = tuple(float(x) for x in ref / n_ref) if n_ref else ()
    win_sh = tuple(float(x) for x in win / n) if n else ()
    if n_ref == 0:
        return Check(name, UNKNOWN, None, threshold, None, n, tuple(bins), ref_sh, win_sh, "no reference data")
    if n < th.min_window:
        return Check(name, INSUFFICIENT, None, threshold, None, n, tuple(bins), ref_sh, win_sh,
                     f"{n} values; alarms need {th.min_window}")
    value = psi(ref, win)
    floor = noise_floor(int(((ref > 0) | (win > 0)).sum()), n, n_ref)
    status = DRIFT if value > threshold and value > floor else OK
    return Check(name, status, value, threshold, floor, n, tuple(bins), ref_sh, win_sh)


def bin_labels(edges: Sequence[float]) -> tuple[str, ...]:
    def f(x):
        return "∞" if x >= 1e9 else f"{x:g}"
    return tuple(f"{f(a)}–{f(b)}" for a, b in zip(edges[:-1], edges[1:], strict=True))


def compare(reference: Reference, window: Window, th: Thresholds) -> list[Check]:
    """Every check of ``window`` against ``reference`` (a check whose section is missing is UNKNOWN)."""
    out: list[Check] = []
    preds = reference.section("predictions") or {}
    if preds:
        vocab = list(preds["class_counts"])
        index = {c: i for i, c in enumerate(vocab)}
        win = np.bincount([index[c] for c in window.predicted if c in index], minlength=len(vocab))
        out.append(check("classes", list(preds["class_counts"].values()), win, vocab, th))
        hist = preds["confidence"]
        out.append(check("confidence", hist["counts"], bin_counts(window.confidence, hist["edges"]),
                         bin_labels(hist["edges"]), th))
    unfamiliar = reference.section("unfamiliar") or {}
    if window.unfamiliar is not None and "reference_rate" in unfamiliar:
        # The detector's own section says how often it flags reference images (its calibrated false-positive rate).
        rate, n_ref = float(unfamiliar["reference_rate"]), int(unfamiliar.get("n", reference.doc["n_images"]))
        flags = window.unfamiliar[~np.isnan(window.unfamiliar)]
        out.append(check("unfamiliar", [n_ref * (1 - rate), n_ref * rate],
                         [(flags < 0.5).sum(), (flags >= 0.5).sum()], ("familiar", "unfamiliar"), th))
    inputs = reference.section("inputs") or {}
    if inputs:
        values = {"brightness": window.brightness,
                  "resolution": resolution(window.width, window.height),
                  "aspect": aspect(window.width, window.height)}
        for name in ("brightness", "resolution", "aspect"):
            hist = inputs[name]
            out.append(check(name, hist["counts"], bin_counts(values[name], hist["edges"]),
                             bin_labels(hist["edges"]), th))
        grey = inputs["greyscale"]
        sat = window.saturation[~np.isnan(window.saturation)]
        is_grey = sat < grey["threshold"]
        out.append(check("greyscale", [grey["grey"], grey["colour"]], [is_grey.sum(), (~is_grey).sum()],
                         ("greyscale", "colour"), th))
    return out


def unfamiliar_rate(window: Window) -> float | None:
    if window.unfamiliar is None:
        return None
    flags = window.unfamiliar[~np.isnan(window.unfamiliar)]
    return float((flags >= 0.5).mean()) if len(flags) else None


__all__ = ["EDGES", "Check", "Thresholds", "Window", "check", "compare", "noise_floor", "psi"]
