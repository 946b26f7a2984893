"""Unfamiliar inputs on the demo: which score, at what false-alarm rate, for what cost. ``python -m bench.unfamiliar_bench``

1. Scores compared: max softmax (1 - top probability), energy (-logsumexp of the logits), Mahalanobis distance of
   the features to the nearest class mean (shared covariance), kNN distance (1st neighbour, cosine) to the reference
   features, and an input-statistics score (brightness / saturation outside the reference's range). Each is fitted
   on one half of the demo's held-out digits (rendered as its reference is: soft 128 px and pen 280 px strokes, dark
   on light and light on dark) and thresholded at the 95th percentile of that half's scores (out of fold for
   Mahalanobis and kNN, each digit's renderings in one fold); "held-out digits" is the other half. Junk:
   scikit-learn's sample photos and crops of them, blanks, noise, rendered text. Shifted digits (rotated, blurred) are reported without a target.
2. Cost: ``Pipeline.predict`` of one image with the detector vs without, interleaved rounds, same process (p50).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from model import unfamiliar as U

WORDS = ("hello", "Loupe", "the quick brown fox", "STOP", "menu", "abc", "Paris", "cat", "xyz", "image",
         "warning", "OK", "jumps over", "lazy dog", "Python", "review")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


# --- image sets --------------------------------------------------------------------------------------------------
def digits_halves():
    """(fit half, held-out half) of the demo's held-out digits as its reference renders them; labels too."""
    from model.demo import SEED, _split, invert, render, render_pen

    digits, _, valid = _split()
    rng = np.random.RandomState(SEED + 2)
    halves = ([], []), ([], [])
    for k, i in enumerate(valid):
        images, labels = halves[k % 2]
        dark = [render(digits.data[i], 128), render_pen(digits.data[i], rng, 280)]
        images += dark + [invert(im) for im in dark]
        labels += [int(digits.target[i])] * 4
    return halves


def junk(seed: int = 0) -> dict[str, list[Image.Image]]:
    from sklearn.datasets import load_sample_images

    from bench.drift_streams import photo_crops

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    blanks = [Image.new("RGB", (s, s), c) for s in (64, 280, 640) for c in
              ((255, 255, 255), (0, 0, 0), (128, 128, 128), (200, 30, 30), (240, 240, 230))]
    noise = []
    for _ in range(60):
        w, h = (int(x) for x in rng.integers(32, 512, size=2))
        kind = int(rng.integers(3))
        if kind == 0:
            arr = rng.integers(0, 256, size=(h, w, 3))
        elif kind == 1:
            arr = np.repeat(rng.integers(0, 256, size=(h, w, 1)), 3, axis=2)
        else:
            arr = np.clip(rng.normal(128, 60, size=(h, w, 3)), 0, 255)
        noise.append(Image.fromarray(arr.astype(np.uint8)))
    text = []
    for k in range(48):
        word = WORDS[k % len(WORDS)]
        size = int(rng.integers(24, 72))
        font = ImageFont.truetype(FONT, size)
        w = int(font.getlength(word)) + 40
        img = Image.new("RGB", (w, size + 40), "white")
        ImageDraw.Draw(img).text((20, 20), word, fill="black", font=font)
        text.append(img)
    return {"photos (full)": photos, "photo crops": photo_crops(200, seed), "blank": blanks, "noise": noise,
            "rendered text": text}


def shifted(images: list[Image.Image]) -> dict[str, list[Image.Image]]:
    # Corners uncovered by a rotation take the paper's colour (white or black: both polarities are in the reference).
    return {"rotated 90°": [im.rotate(90, fillcolor=im.getpixel((0, 0))) for im in images],
            "rotated 30°": [im.rotate(30, fillcolor=im.getpixel((0, 0))) for im in images],
            "blurred (radius 4% of side)": [im.filter(ImageFilter.GaussianBlur(im.width * 0.04)) for im in images]}


# --- model outputs -------------------------------------------------------------------------------------------------
def outputs(predictor, images: list, batch: int = 64) -> dict:
    """probs, features, logits (ONNX: straight from its session) and input statistics."""
    from model.predictor import softmax
    from model.reference import measure

    probs, feats, logits = [], [], []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        x = predictor.prepare(chunk)
        raw = predictor._alone.run(predictor._outputs, {predictor._input: x})  # bench only: the logits too
        logits.append(raw[0])
        feats.append(raw[1])
        probs.append(softmax(raw[0]))
    stats = [measure(im) for im in images]
    return {"probs": np.concatenate(probs), "features": np.concatenate(feats), "logits": np.concatenate(logits),
            "brightness": np.array([s["brightness"] for s in stats]),
            "saturation": np.array([s["saturation"] for s in stats])}


class Scores:
    """Every score, fitted on the fit half."""

    def __init__(self, fit: dict, groups: np.ndarray, n_classes: int):
        self.section = U.fit(fit["features"], fit["probs"].argmax(1), n_classes, groups=groups)
        self.det = U.Detector.from_section(self.section)
        self.ref_feats = fit["features"]
        self.ranges = {k: np.quantile(fit[k], (0.005, 0.995)) for k in ("brightness", "saturation")}
        self.spread = {k: max(float(np.std(fit[k])), 1e-3) for k in ("brightness", "saturation")}
        self.thresholds = {"mahalanobis": self.det.threshold}
        for name in ("max softmax", "energy", "input statistics"):
            self.thresholds[name] = float(np.quantile(self.score(name, fit), U.QUANTILE))
        # out of fold like Mahalanobis's (a digit's other renderings would be its nearest neighbours)
        folds, oof = U.fold_of(len(groups), U.FOLDS, groups), np.empty(len(groups))
        for k in range(U.FOLDS):
            oof[folds == k] = U.knn_distance(fit["features"][folds == k], fit["features"][folds != k])
        self.thresholds["kNN"] = float(np.quantile(oof, U.QUANTILE))

    def score(self, name: str, out: dict) -> np.ndarray:
        if name == "max softmax":
            return U.max_softmax(out["probs"])
        if name == "energy":
            return U.energy(out["logits"])
        if name == "mahalanobis":
            return self.det.scores(out["features"])
        if name == "kNN":
            return U.knn_distance(out["features"], self.ref_feats)
        if name == "input statistics":
            return np.max([np.maximum(np.maximum(self.ranges[k][0] - out[k], out[k] - self.ranges[k][1]), 0)
                           / self.spread[k] for k in ("brightness", "saturation")], axis=0)
        raise KeyError(name)

    def flagged(self, name: str, out: dict) -> np.ndarray:
        return self.score(name, out) > self.thresholds[name]


NAMES = ("max softmax", "energy", "kNN", "mahalanobis", "input statistics")


def table(predictor) -> tuple[list[str], dict]:
    (fit_images, _), (held_images, _) = digits_halves()
    n_classes = len(predictor.info.vocab)
    fit = outputs(predictor, fit_images)
    scores = Scores(fit, np.arange(len(fit_images)) // 4, n_classes)  # digits_halves: 4 renderings per digit
    rows: list[tuple[str, str, int, dict]] = [("held-out digits (target ≤ 5%)", "in", len(held_images),
                                               outputs(predictor, held_images))]
    junk_sets = junk()
    for name, images in junk_sets.items():
        rows.append((name, "junk", len(images), outputs(predictor, images)))
    for name, images in shifted(held_images).items():
        rows.append((f"shifted: {name}", "shifted", len(images), outputs(predictor, images)))
    lines = ["| images | n | " + " | ".join(NAMES) + " |", "|---|---|" + "---|" * len(NAMES)]
    all_junk = {n: [] for n in NAMES}
    for label, kind, n, out in rows:
        cells = []
        for name in NAMES:
            f = scores.flagged(name, out)
            if kind == "junk":
                all_junk[name].append(f)
            cells.append(f"{f.mean():.1%}")
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    lines.insert(3, "| **all junk (target ≥ 95%)** | " + str(sum(len(v) for v in junk_sets.values())) + " | "
                 + " | ".join(f"**{np.concatenate(all_junk[n]).mean():.1%}**" for n in NAMES) + " |")
    return lines, scores.section


# --- cost ----------------------------------------------------------------------------------------------------------
def cost(predictor, section: dict, rounds: int) -> list[str]:
    """Pipeline.predict p50, one 128 px digit per call, with the detector vs without, interleaved."""
    from io import BytesIO

    from review.db import utcnow  # noqa: F401 - the store's import chain, loaded before timing
    from serving.pipeline import Input, Pipeline
    from serving.router import ModelRouter

    class NullLog:
        def log_prediction(self, **kw) -> str:
            return "x"

    buf = BytesIO()
    digits_halves()[1][0][0].save(buf, format="PNG")
    item = Input(buf.getvalue(), "api")
    plain = Pipeline(ModelRouter(predictor), NullLog(), max_bytes=1 << 24, max_pixels=1 << 26, top_k=3)
    det = U.Detector.from_section(section)  # loaded once, as serving.unfamiliar.Detectors does
    flagged = Pipeline(ModelRouter(predictor), NullLog(), max_bytes=1 << 24, max_pixels=1 << 26, top_k=3,
                       detectors=lambda info: det)
    assert flagged.predict_one(item).unfamiliar is not None
    times = {"without": [], "with": []}
    for _ in range(10):
        plain.predict_one(item), flagged.predict_one(item)
    for r in range(rounds):
        for name, p in (("without", plain), ("with", flagged)) if r % 2 else (("with", flagged), ("without", plain)):
            t = time.perf_counter()
            p.predict_one(item)
            times[name].append((time.perf_counter() - t) * 1000)
    f = np.random.default_rng(0).normal(size=(1, det.dim)).astype(np.float32)
    t = time.perf_counter()
    for _ in range(2000):
        det.flags(f)
    score_us = (time.perf_counter() - t) / 2000 * 1e6
    w, wo = np.median(times["with"]), np.median(times["without"])
    return ["| predict p50, without the flag | with the flag | added | the score alone |", "|---|---|---|---|",
            f"| {wo:.2f} ms | {w:.2f} ms | {(w - wo) / wo:+.1%} | {score_us:.0f} µs |"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.unfamiliar_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=400)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from model.loading import load_predictor
    from settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        predictor = load_predictor(Settings(data_dir=Path(tmp)))
        lines, section = table(predictor)
        print("\n".join(lines))
        print(f"\nchosen: {U.METHOD}, threshold {section['threshold']:.1f} "
              f"({U.QUANTILE * 100:g}th percentile of out-of-fold scores), "
              f"reference rate {section['reference_rate']:.1%}\n")
        print("\n".join(cost(predictor, section, args.rounds)))


if __name__ == "__main__":
    main()
