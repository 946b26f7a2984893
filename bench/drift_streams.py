"""Synthetic traffic for the drift alarms (tests/test_drift.py, bench/monitor_bench.py), on the demo model.

The unshifted stream is drawn like the demo's reference (model/calibrate.py ``demo_items``: soft digits at 128 px
and pen strokes at 280 px, dark on light and light on dark) but from the *training* split, so it never repeats a
reference image.
Shifts: darkened (night-time), downscaled to 32 px (a low-resolution camera), one class flooding, and a burst of
photos (crops of scikit-learn's bundled sample photos: no download).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from model.reference import measure
from review.drift import Window

SHIFTS = ("unshifted", "darkened", "downscaled", "flooding", "photos")


def digit_pool(seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """Every training-split digit, rendered as the reference is (in turn: soft 128 px, pen 280 px, each dark on
    light, then light on dark)."""
    from model.demo import _split, invert, render, render_pen

    digits, train, _ = _split()
    rng = np.random.RandomState(seed)
    images, labels = [], []
    for k, i in enumerate(train):
        img = render(digits.data[i], 128) if k % 2 == 0 else render_pen(digits.data[i], rng, 280)
        images.append(invert(img) if k % 4 >= 2 else img)
        labels.append(str(digits.target[i]))
    return images, labels


def photo_crops(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` random crops (100-420 px, any aspect) of scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = int(rng.integers(100, 421)), int(rng.integers(100, 421))
        x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
        out.append(photo.crop((x, y, x + w, y + h)))
    return out


def stream(kind: str, pool: tuple[list, list], n: int, *, seed: int = 0, strength: float | None = None) -> list:
    """``n`` images of one kind of traffic. ``strength``: darkening factor, downscaled side, flooding share or photo
    share (defaults: 0.4, 32 px, 0.6, 0.3)."""
    images, labels = pool
    rng = np.random.default_rng(seed)
    pick = [images[i] for i in rng.choice(len(images), size=n, replace=False)]
    if kind == "unshifted":
        return pick
    if kind == "darkened":
        return [ImageEnhance.Brightness(im).enhance(strength or 0.4) for im in pick]
    if kind == "downscaled":
        side = int(strength or 32)
        return [im.resize((side, side), Image.Resampling.BILINEAR) for im in pick]
    if kind == "flooding":
        ones = [im for im, y in zip(images, labels, strict=True) if y == "1"]
        k = int(round(n * (strength or 0.6)))
        flood = [ones[i] for i in rng.choice(len(ones), size=k, replace=k > len(ones))]
        out = flood + pick[: n - k]
        rng.shuffle(out)
        return out
    if kind == "photos":
        k = int(round(n * (strength or 0.3)))
        out = photo_crops(k, seed) + pick[: n - k]
        rng.shuffle(out)
        return out
    raise ValueError(f"unknown stream {kind!r}; one of {SHIFTS}")


def window(predictor, images: list, batch: int = 64) -> Window:
    """What the prediction log would hold for these images (the model's answers and measured statistics)."""
    probs = np.concatenate([predictor.predict_probs(images[i:i + batch]) for i in range(0, len(images), batch)])
    stats = [measure(im) for im in images]
    vocab = predictor.info.vocab
    rows = [{"predicted": vocab[int(p.argmax())], "confidence": float(p.max()), **s}
            for p, s in zip(probs, stats, strict=True)]
    return Window.from_rows(rows)
