"""Reference data per model version: what the model's training/validation images look like, for drift alarms.

A JSON file per model export, found by the export's sha256:

* ``<data_dir>/models/<sha256>/reference.json`` (beside a retrained export; ``python -m model.calibrate`` writes it),
* else, for the demo model, the committed ``model/demo_artifacts/reference.json``.

Format (``FORMAT`` / ``VERSION``; readers refuse a newer VERSION, and keep sections they do not know)::

    {"format": "loupe-reference", "version": 1, "created": "<iso>", "source": "<what it was computed from>",
     "model": {"version": ..., "sha256": ..., "vocab": [...]}, "n_images": N,
     "sections": {
        "predictions": {"n", "class_counts": {class: n}, "label_counts": {label: n} | null, "accuracy": x | null,
                        "confidence": {"edges": [...], "counts": [...]}},
        "inputs": {"n", "brightness" | "resolution" | "aspect": {"edges": [...], "counts": [...]},
                   "greyscale": {"threshold": t, "grey": n, "colour": n}, "summary": {...}},
        "unfamiliar": {"reference_rate": r, "n": N, ...}   # the unfamiliar-input detector's (its own keys);
     }}                                                   # drift alarms read the share of reference images it
                                                          # flags ("reference_rate") and compare the live rate

Histograms have fixed edges (stored with the counts, so a later change of edges never mis-compares an old file):
fixed bins, not the reference's deciles, because these statistics are often discrete (every training image 32x32,
half the confidences exactly 1.0) and deciles of discrete data collapse.

Computing it is a stream of image batches through ``Section`` accumulators (``add(batch)`` then ``finish()``), so a
new kind of reference data is one more section: ``compute_reference(predictor, items, sections=[...])``.

Input statistics are measured the same way here and by the prediction log's writer (``measure``), on at most
64 x 64 sampled pixels: brightness (mean luminance, serving.imageio.image_stats) and saturation. "Saturation" is
the mean chroma, (max - min of R, G, B) / 255 per pixel: HSV saturation without its division by the value, which
makes near-black pixels of a greyscale photo look vivid. An image is greyscale when its saturation is below
``GREYSCALE_BELOW`` (0.04: greyscale JPEGs stored as colour carry ~0.01 of chroma noise; colour photos measure
0.1-0.5). Resolution is sqrt(width x height) in pixels, the aspect ratio width / height.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

FORMAT = "loupe-reference"
VERSION = 1
FILENAME = "reference.json"
GREYSCALE_BELOW = 0.04
_SAMPLE_SIDE = 64  # as serving.imageio.image_stats samples brightness

# Fixed histogram edges; the last bin is closed (values above the last edge are clipped into it).
EDGES: dict[str, tuple[float, ...]] = {
    "confidence": (0.0, 0.5, 0.7, 0.9, 0.97, 0.99, 1.0),
    "brightness": tuple(round(i / 10, 1) for i in range(11)),
    # sqrt(w*h) in px, by two octaves (x4): a low-resolution camera is a drop of that order, while one model's
    # ordinary inputs often differ by 2x (the demo's examples are 128 px, its drawing canvas 280 px)
    "resolution": (0.0, 24.0, 96.0, 384.0, 1536.0, 6144.0, 1e9),
    # width / height: tall ... square ... wide (4:3 = 1.33, 16:9 = 1.78)
    "aspect": (0.0, 0.5, 0.7, 0.9, 1.1, 1.4, 2.0, 1e9),
}


class ReferenceError(ValueError):
    """A missing, unreadable or foreign reference file; ``args[0]`` says what to do."""


# --- input statistics -----------------------------------------------------------------------------------------
def _sample(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w > _SAMPLE_SIDE or h > _SAMPLE_SIDE:
        img = img.resize((min(w, _SAMPLE_SIDE), min(h, _SAMPLE_SIDE)), Image.Resampling.NEAREST)
    if img.mode != "RGB":
        from serving.imageio import to_rgb

        img = to_rgb(img)
    return img


def saturation(img: Image.Image) -> float:
    """Mean chroma in [0, 1] (module docstring), on at most 64 x 64 sampled pixels (~30 us)."""
    arr = np.asarray(_sample(img))
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]  # per channel: ndarray.max(axis=2) was 10x slower here
    return float((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).mean()) / 255.0


def measure(img: Image.Image) -> dict:
    """``{"width", "height", "brightness", "saturation"}``: what the prediction log stores per image."""
    from serving.imageio import image_stats

    return {**image_stats(img), "saturation": saturation(img)}


def resolution(width, height) -> np.ndarray:
    return np.sqrt(np.asarray(width, dtype=np.float64) * np.asarray(height, dtype=np.float64))


def aspect(width, height) -> np.ndarray:
    h = np.asarray(height, dtype=np.float64)
    return np.asarray(width, dtype=np.float64) / np.where(h > 0, h, np.nan)


def bin_counts(values, edges: Sequence[float]) -> np.ndarray:
    """Counts per bin (len(edges) - 1 bins; values outside clip to the end bins; NaN is left out)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    idx = np.clip(np.searchsorted(np.asarray(edges), v, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1)


def histogram(values, name: str) -> dict:
    return {"edges": list(EDGES[name]), "counts": bin_counts(values, EDGES[name]).tolist()}


# --- sections -------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """What every section sees of one batch of reference images."""

    images: list[Image.Image]  # decoded exactly as uploads are (serving.imageio.decode_image), RGB
    labels: list[str | None]  # the dataset's labels (None: unlabelled)
    probs: np.ndarray  # (n, classes): the model's answers, in its vocab order
    stats: list[dict]  # measure(image) per image
    predictor: object  # the model (e.g. for features from another output)
    features: np.ndarray | None = None  # (n, D) the classifier's input (model/graph.py), None if the model has none
    groups: list | None = None  # per image: its source (renderings of one digit share one), None: every image its own


class Section(Protocol):
    name: str

    def add(self, batch: Batch) -> None: ...

    def finish(self) -> dict: ...


@dataclass
class PredictionsSection:
    """Predicted-class shares, the confidence distribution and (with labels) the accuracy on the reference."""

    vocab: tuple[str, ...]
    name: str = "predictions"
    _top: list = field(default_factory=list)
    _conf: list = field(default_factory=list)
    _labels: list = field(default_factory=list)

    def add(self, batch: Batch) -> None:
        self._top += batch.probs.argmax(axis=1).tolist()
        self._conf += batch.probs.max(axis=1).tolist()
        self._labels += batch.labels

    def finish(self) -> dict:
        counts = np.bincount(np.asarray(self._top, dtype=np.int64), minlength=len(self.vocab))
        labelled = [(t, y) for t, y in zip(self._top, self._labels, strict=True) if y is not None]
        label_counts = None
        if labelled:
            label_counts = {}
            for _, y in sorted(labelled, key=lambda ty: ty[1]):
                label_counts[y] = label_counts.get(y, 0) + 1
        return {"n": len(self._top), "class_counts": {c: int(n) for c, n in zip(self.vocab, counts, strict=True)},
                "label_counts": label_counts,
                "accuracy": (sum(self.vocab[t] == y for t, y in labelled) / len(labelled)) if labelled else None,
                "confidence": histogram(self._conf, "confidence")}


@dataclass
class InputsSection:
    """Brightness, resolution, aspect ratio and greyscale share of the reference images."""

    name: str = "inputs"
    _rows: list = field(default_factory=list)

    def add(self, batch: Batch) -> None:
        self._rows += [(s["width"], s["height"], s["brightness"], s["saturation"]) for s in batch.stats]

    def finish(self) -> dict:
        w, h, b, s = (np.asarray(c, dtype=np.float64) for c in zip(*self._rows, strict=True)) if self._rows \
            else (np.zeros(0),) * 4
        res, asp = resolution(w, h), aspect(w, h)
        grey = int((s < GREYSCALE_BELOW).sum())

        def q(v):
            return [round(float(x), 4) for x in np.quantile(v, (0.05, 0.5, 0.95))] if len(v) else None

        return {"n": len(self._rows), "brightness": histogram(b, "brightness"),
                "resolution": histogram(res, "resolution"), "aspect": histogram(asp, "aspect"),
                "greyscale": {"threshold": GREYSCALE_BELOW, "grey": grey, "colour": len(self._rows) - grey},
                "summary": {"brightness_q05_50_95": q(b), "resolution_q05_50_95": q(res),
                            "aspect_q05_50_95": q(asp), "saturation_q05_50_95": q(s)}}


def default_sections(predictor) -> list[Section]:
    return [PredictionsSection(tuple(predictor.info.vocab)), InputsSection()]


# --- computing --------------------------------------------------------------------------------------------------
def compute_reference(predictor, items: Iterable[tuple], *, source: str,
                      sections: Sequence[Section] | None = None, batch_size: int = 32,
                      on_batch: Callable[[int], None] | None = None) -> dict:
    """Run ``items`` ((decoded image, label or None[, group]), ...) through the model in batches, feed every section,
    and return the reference document. ``group``: images from one source (e.g. renderings of one digit), which
    out-of-fold fits keep in one fold. ``on_batch(n)``: progress (n images done in this batch)."""
    sections = list(sections) if sections is not None else default_sections(predictor)
    n = 0

    def flush(images, labels, groups):
        if hasattr(predictor, "predict"):  # the serving predictors: probabilities and features in one pass
            probs, feats = predictor.predict(images)
        else:
            probs, feats = predictor.predict_probs(images), None
        batch = Batch(images, labels, np.asarray(probs, dtype=np.float64), [measure(im) for im in images], predictor,
                      None if feats is None else np.asarray(feats, dtype=np.float32),
                      None if all(g is None for g in groups) else groups)
        for section in sections:
            section.add(batch)
        if on_batch is not None:
            on_batch(len(images))

    images: list = []
    labels: list = []
    groups: list = []
    for img, label, *group in items:
        images.append(img)
        labels.append(label)
        groups.append(group[0] if group else None)
        n += 1
        if len(images) >= batch_size:
            flush(images, labels, groups)
            images, labels, groups = [], [], []
    if images:
        flush(images, labels, groups)
    if n == 0:
        raise ReferenceError("no images to compute a reference from")
    info = predictor.info
    return {"format": FORMAT, "version": VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": source, "model": {"version": info.version, "sha256": info.sha256, "vocab": list(info.vocab)},
            "n_images": n, "sections": {s.name: s.finish() for s in sections}}


# --- files --------------------------------------------------------------------------------------------------------
def reference_path(data_dir: Path, sha256: str) -> Path:
    """Where a model's reference lives: beside a retrained export (model/retrain.py uses the same folder)."""
    return Path(data_dir) / "models" / sha256 / FILENAME


def find_reference(data_dir: Path, sha256: str) -> Path | None:
    """The data dir's file for this export, else the demo's committed one (for the demo export), else None."""
    path = reference_path(data_dir, sha256)
    if path.is_file():
        return path
    from model.demo import DEMO_EXPORT, DEMO_SHA256

    demo = DEMO_EXPORT.parent / FILENAME
    return demo if sha256 == DEMO_SHA256 and demo.is_file() else None


def save_reference(doc: dict, path: Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".reference-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=False, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from an app running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Reference:
    doc: dict
    path: Path | None = None

    @property
    def sha256(self) -> str:
        return self.doc["model"]["sha256"]

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(self.doc["model"]["vocab"])

    def section(self, name: str) -> dict | None:
        return self.doc.get("sections", {}).get(name)


def parse_reference(doc: object, *, expect_sha256: str | None = None, where: str = "reference") -> Reference:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReferenceError(f"{where} is not a Loupe reference file (format {FORMAT!r})")
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ReferenceError(f"{where} has format version {version!r}; this Loupe reads up to {VERSION}. "
                             "Recompute it: python -m model.calibrate <folder|labels.csv>")
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("sha256"), str) or \
            not isinstance(model.get("vocab"), list) or not isinstance(doc.get("sections"), dict):
        raise ReferenceError(f"{where} lacks its model or sections")
    if expect_sha256 is not None and model["sha256"] != expect_sha256:
        raise ReferenceError(f"{where} was computed for another model (sha256 {model['sha256'][:12]}…, not "
                             f"{expect_sha256[:12]}…)")
    return Reference(doc)


def load_reference(path: Path, *, expect_sha256: str | None = None) -> Reference:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ReferenceError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ReferenceError(f"{path} is not valid JSON ({e})") from None
    ref = parse_reference(doc, expect_sha256=expect_sha256, where=str(path))
    return Reference(ref.doc, path)
