"""The promotion gate: is a candidate no worse than the current model? (model.rollout.promote asks it; so do the
CLI's ``gate`` command and the Models tab, through the same ``evaluate``.)

Four checks, every one must pass (an override is possible, recorded and loud: model.rollout):

1. ``audit`` - the random audit sample (``LOUPE_AUDIT_RATE``), as reviewers labelled it, minus every image either
   model was trained on. Unbiased: the sample was drawn at random from live traffic. Both models score the same
   items; the candidate passes when the 95% confidence interval of the accuracy difference (candidate minus
   current) lies above ``-gate_margin``. No items: it fails (review some: reason "audit").
2. ``reviewed`` - every other reviewed item neither model was trained on (queued for low confidence, high loss, a
   user's claim...). Chosen by the current model's doubts, so biased: it only refuses a candidate that is
   *significantly* worse (the interval's upper end below 0).
3. ``heldout`` - the candidate's held-out split (the registry lists it), minus what the current model trained on,
   scored by both, same rule as 1. Where those images are not on this machine, the registry's held-out error rates
   are compared instead (the candidate's must not be higher).
4. ``shadow`` - at least ``gate_min_shadowed`` live requests scored in shadow against the current model, and a person
   has looked at every one where the two disagreed (model.rollout.mark_seen, recorded with their name).

Why a paired interval: both models answer the same items, so what makes an item hard cancels out, and only the
items where they differ carry information. Two separate Wilson intervals (shown too, for the reader) almost always
overlap at the sample sizes reviewers produce, so they could neither refuse a worse model nor show a better one.
The interval is Tango's score interval for a paired difference of proportions: near-nominal coverage with few
discordant pairs, and sensible when there are none (it then reduces to the Wilson bound of the discordance rate:
with n agreeing items the difference can still be as low as -3.84 / (n + 3.84)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import func, select

from model import versions
from review.db import QueueEntry, RolloutAction, ShadowPrediction, TrainingImage
from review.export import reviewed_outcomes

Z95 = 1.959964
BATCH = 64


# --- statistics --------------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def tango_interval(b: int, c: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Score interval (Tango 1998) of the paired difference (b - c) / n, where b items only the candidate got right
    and c items only the current model got right, out of n."""
    if n == 0:
        return -1.0, 1.0

    def score(d: float) -> float:  # decreasing in d; 0 at the estimate
        a2 = 2 * n
        bb = -b - c + (2 * n - b + c) * d
        cc = -c * d * (1 - d)
        p21 = (math.sqrt(max(bb * bb - 4 * a2 * cc, 0.0)) - bb) / (2 * a2)  # constrained MLE of the c-cell
        var = n * (2 * p21 + d * (1 - d))
        num = b - c - n * d
        if var <= 0:
            return 0.0 if num == 0 else math.copysign(math.inf, num)
        return num / math.sqrt(var)

    def solve(target: float) -> float:
        lo, hi = -1.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if score(mid) > target else (lo, mid)
        return (lo + hi) / 2

    return solve(z), solve(-z)


@dataclass(frozen=True)
class Paired:
    """Both models on the same n items: accuracies with Wilson intervals, and the paired difference."""

    n: int
    candidate_right: int
    current_right: int
    only_candidate: int  # items the candidate got right and the current model wrong
    only_current: int

    @classmethod
    def of(cls, candidate_correct: np.ndarray, current_correct: np.ndarray) -> Paired:
        a, b = np.asarray(candidate_correct, bool), np.asarray(current_correct, bool)
        return cls(len(a), int(a.sum()), int(b.sum()), int((a & ~b).sum()), int((~a & b).sum()))

    @property
    def difference(self) -> float:
        return (self.only_candidate - self.only_current) / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return tango_interval(self.only_candidate, self.only_current, self.n)

    def describe(self) -> dict:
        lo, hi = self.interval
        return {**asdict(self), "candidate_accuracy": _ratio(self.candidate_right, self.n),
                "current_accuracy": _ratio(self.current_right, self.n),
                "candidate_wilson": [round(x, 4) for x in wilson(self.candidate_right, self.n)],
                "current_wilson": [round(x, 4) for x in wilson(self.current_right, self.n)],
                "difference": round(self.difference, 4), "difference_ci": [round(lo, 4), round(hi, 4)]}

    def sentence(self) -> str:
        if not self.n:
            return "no items"
        lo, hi = self.interval
        return (f"{self.n} items: candidate {self.candidate_right / self.n:.1%}, current "
                f"{self.current_right / self.n:.1%}; difference {self.difference:+.1%} (95% CI {lo:+.1%} to "
                f"{hi:+.1%}; {self.only_candidate} only the candidate got right, {self.only_current} only the current)")


def _ratio(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


# --- the checks --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str  # audit | reviewed | heldout | shadow
    title: str
    passed: bool
    summary: str  # one line a person reads
    numbers: dict


@dataclass(frozen=True)
class GateResult:
    candidate: str
    current: str
    margin: float
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "current": self.current, "margin": self.margin, "passed": self.passed,
                "checks": [asdict(c) for c in self.checks]}

    def text(self) -> str:
        lines = [f"Gate for {self.candidate} against {self.current}: {'PASSED' if self.passed else 'FAILED'}"]
        lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.title}: {c.summary}" for c in self.checks]
        return "\n".join(lines)


Scorer = Callable[[versions.VersionRecord], object]  # record -> predictor (predict_probs, info)


def image_finder(store, settings) -> Callable[[str], Path | None]:
    """Where an image the gate needs is on this machine: the review image store, or the training-set store that
    model.retrain fills (``<cache_dir>/trainset``)."""
    roots = [store.images.root, Path(settings.cache_dir) / "trainset"]

    def find(sha: str) -> Path | None:
        for root in roots:
            path = Path(root) / sha[:2] / f"{sha}.png"
            if path.is_file():
                return path
        return None

    return find


def correct(predictor, paths: Sequence[Path], labels: Sequence[str]) -> np.ndarray:
    """Whether ``predictor``'s top class is the label, per image (our own stored PNGs, scored in batches)."""
    vocab = predictor.info.vocab
    out = []
    for i in range(0, len(paths), BATCH):
        images = []
        for p in paths[i : i + BATCH]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        probs = np.asarray(predictor.predict_probs(images))
        out += [vocab[int(k)] == label for k, label in zip(probs.argmax(axis=1), labels[i : i + BATCH], strict=True)]
    return np.asarray(out, dtype=bool)


def _paired(items: list[tuple[Path, str]], models: Callable[[], tuple]) -> Paired:
    """Both models on ``items``; ``models()`` loads them only when there is something to score."""
    if not items:
        return Paired(0, 0, 0, 0, 0)
    cand, cur = models()
    paths, labels = [p for p, _ in items], [label for _, label in items]
    return Paired.of(correct(cand, paths, labels), correct(cur, paths, labels))


def _trained(session, version: str) -> set[str]:
    return set(session.scalars(select(TrainingImage.image_sha256).where(TrainingImage.version == version,
                                                                        TrainingImage.split == "train")))


def gather(session, store, candidate, current, find) -> dict:
    """The items each check scores (read in one transaction): {name: [(path, label)]}, plus counts of what was
    left out and why."""
    trained = _trained(session, candidate.version) | _trained(session, current.version)
    classes = set(candidate.vocab) | set(current.vocab)
    labelled, _ = reviewed_outcomes(session, store.images)
    audit = set(session.scalars(select(QueueEntry.image_sha256).where(QueueEntry.audit.is_(True))))
    out = {"audit": [], "reviewed": [], "heldout": [], "left_out": {"trained_on": 0, "unknown_class": 0,
                                                                    "heldout_missing": 0}}
    for sha, label in labelled:
        if sha in trained:
            out["left_out"]["trained_on"] += 1
        elif label not in classes:
            out["left_out"]["unknown_class"] += 1  # another model family's classes: neither model can be right
        elif (path := find(sha)) is not None:
            out["audit" if sha in audit else "reviewed"].append((path, label))
    valid = session.execute(select(TrainingImage.image_sha256, TrainingImage.label).where(
        TrainingImage.version == candidate.version, TrainingImage.split == "valid")).all()
    for sha, label in valid:
        if sha in trained:
            continue
        path = find(sha)
        if path is None:
            out["left_out"]["heldout_missing"] += 1
        else:
            out["heldout"].append((path, label))
    out["heldout_listed"] = len(valid)
    return out


def shadow_evidence(session, candidate: str, current: str) -> dict:
    """Shadowed requests of ``candidate`` against ``current``, their disagreements, and who looked at them."""
    base = (ShadowPrediction.model_version == candidate, ShadowPrediction.served_version == current)
    shadowed = session.scalar(select(func.count()).select_from(ShadowPrediction).where(*base)) or 0
    disagree = select(ShadowPrediction.id).where(*base, ShadowPrediction.agrees.is_(False))
    n_disagree = session.scalar(select(func.count()).select_from(disagree.subquery())) or 0
    seen = session.scalars(select(RolloutAction).where(
        RolloutAction.action == "seen", RolloutAction.version == candidate, RolloutAction.against == current)
        .order_by(RolloutAction.id.desc()).limit(1)).first()
    upto = session.scalar(select(func.max(RolloutAction.seen_upto)).where(
        RolloutAction.action == "seen", RolloutAction.version == candidate, RolloutAction.against == current)) or 0
    unseen = session.scalar(select(func.count()).select_from(
        disagree.where(ShadowPrediction.id > upto).subquery())) or 0
    return {"shadowed": shadowed, "disagreements": n_disagree, "unseen": unseen,
            "seen_by": seen.actor if seen else None, "seen_at": seen.created.isoformat() if seen else None}


def evaluate(store, settings, candidate, current, load: Scorer) -> GateResult:
    """Run every check of the gate for ``candidate`` against ``current`` (VersionRecords)."""
    find = image_finder(store, settings)

    def read(session):
        return gather(session, store, candidate, current, find), shadow_evidence(session, candidate.version,
                                                                                 current.version)

    items, shadow = store.transaction(read, read=True)
    loaded: list = []

    def models() -> tuple:
        if not loaded:
            loaded.extend((load(candidate), load(current)))
        return tuple(loaded)

    margin = settings.gate_margin
    checks = []

    audit = _paired(items["audit"], models)
    lo, hi = audit.interval
    checks.append(Check(
        "audit", "Random audit sample (reviewed, neither model trained on it)", audit.n > 0 and lo >= -margin,
        (audit.sentence() + (f"; needs the interval's lower end at {-margin:+.1%} or above" if lo < -margin else ""))
        if audit.n else "no reviewed audit-sample items that neither model was trained on: review some (Review tab, "
        "reason: audit), or raise LOUPE_AUDIT_RATE", {**audit.describe(), "left_out": items["left_out"]}))

    other = _paired(items["reviewed"], models)
    lo, hi = other.interval
    checks.append(Check(
        "reviewed", "Other reviewed items (chosen by the current model's doubts: refuses only a clearly worse model)",
        not (other.n and hi < 0), other.sentence() if other.n else "none", other.describe()))

    checks.append(_heldout(items, candidate, current, models, margin))

    enough = shadow["shadowed"] >= settings.gate_min_shadowed
    looked = shadow["unseen"] == 0
    summary = (f"{shadow['shadowed']} live requests shadowed (at least {settings.gate_min_shadowed} needed), "
               f"{shadow['disagreements']} disagreements")
    if shadow["disagreements"]:
        summary += ("; all looked at" + (f" by {shadow['seen_by']}" if shadow["seen_by"] else "") if looked
                    else f"; {shadow['unseen']} not looked at yet (Models tab: disagreements)")
    checks.append(Check("shadow", "Shadow traffic: disagreements looked at by a person", enough and looked, summary,
                        shadow))
    return GateResult(candidate.version, current.version, margin, tuple(checks))


def _heldout(items: dict, candidate, current, models, margin: float) -> Check:
    title = "Held-out split"
    if items["heldout"]:
        paired = _paired(items["heldout"], models)
        lo, _ = paired.interval
        missing = items["left_out"]["heldout_missing"]
        note = f" ({missing} of the split's images are not on this machine)" if missing else ""
        return Check("heldout", f"{title} of the candidate (both models scored)", lo >= -margin,
                     paired.sentence() + note, {**paired.describe(), "listed": items["heldout_listed"]})
    a, b = candidate.error_rate, current.error_rate
    if a is None or b is None:
        return Check("heldout", title, False,
                     "cannot check: the candidate's held-out images are not on this machine and the registry lacks "
                     "an error rate; run the gate where the candidate was trained", {"candidate": a, "current": b})
    return Check("heldout", f"{title}s (registry error rates; the splits may differ)", a <= b,
                 f"error rate candidate {a:.2%}, current {b:.2%}", {"candidate": a, "current": b})
