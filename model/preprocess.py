"""Validation-time preprocessing of a fastai image learner, replayed with PIL and numpy.

``learn.predict`` runs fastai's validation pipeline: an item transform that resizes
(``Resize`` with crop/pad/squish, or ``RandomResizedCrop``'s validation branch), ``ToTensor``,
``IntToFloatTensor`` and optionally ``Normalize``. Every geometric step below copies fastai's
``crop_pad`` arithmetic (including its integer truncation and torchvision's padding) so that the
served pixels are the very pixels the learner would see; the golden tests hold us to 1e-4 on the
probabilities. Nothing here imports torch or fastai: a server with a cached bundle never does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

METHODS = ("crop", "pad", "squish", "rrc_valid")
PAD_MODES = {"zeros": "constant", "border": "edge", "reflection": "reflect"}


@dataclass(frozen=True)
class PreprocessSpec:
    """What fastai does to one RGB image at validation time, as plain data (JSON-serialisable)."""

    size: tuple[int, int]  # final (width, height)
    method: str  # one of METHODS
    pad_mode: str = "reflection"  # one of PAD_MODES (fastai names)
    resample: int = int(Image.Resampling.BILINEAR)
    val_final: tuple[int, int] | None = None  # rrc_valid: squish to this size, then centre-crop to `size`
    div: float = 255.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown resize method {self.method!r}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"unknown pad mode {self.pad_mode!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        tup = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**tup)


def _pad(img: Image.Image, ltrb: tuple[int, int, int, int], pad_mode: str) -> Image.Image:
    # torchvision's PIL pad: ImageOps.expand for zeros, np.pad otherwise.
    mode = PAD_MODES[pad_mode]
    if mode == "constant":
        return ImageOps.expand(img, border=ltrb, fill=0)
    left, top, right, bottom = ltrb
    arr = np.pad(np.asarray(img), ((top, bottom), (left, right), (0, 0)), mode)
    return Image.fromarray(arr)


def _crop_pad(
    img: Image.Image,
    sz: tuple[int, int],
    tl: tuple[int, int],
    orig: tuple[int, int],
    spec: PreprocessSpec,
    resize_to: tuple[int, int] | None,
) -> Image.Image:
    # Mirrors fastai.vision.augment._do_crop_pad for PIL images, condition for condition.
    (sw, sh), (tx, ty), (ow, oh) = sz, tl, orig
    if tx >= 0 or ty >= 0 or tx + sw <= ow or ty + sh <= oh:
        img = img.crop((max(tx, 0), max(ty, 0), min(tx + sw, ow), min(ty + sh, oh)))
    if tx < 0 or ty < 0 or tx + sw >= ow or ty + sh >= oh:
        pads = (max(-tx, 0), max(-ty, 0), max(sw - ow + tx, 0), max(sh - oh + ty, 0))
        img = _pad(img, pads, spec.pad_mode)
    if resize_to is not None:
        img = img.resize(resize_to, spec.resample)
    return img


def resize_like_fastai(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The item transform at validation time: RGB PIL image in, RGB PIL image of ``spec.size`` out."""
    w, h = orig = img.size
    tw, th = spec.size
    if spec.method == "squish":
        return _crop_pad(img, orig, (0, 0), orig, spec, spec.size)
    if spec.method == "rrc_valid":
        final = spec.val_final or spec.size
        img = _crop_pad(img, orig, (0, 0), orig, spec, final)
        if final != spec.size:
            tl = ((final[0] - tw) // 2, (final[1] - th) // 2)
            img = _crop_pad(img, spec.size, tl, final, spec, None)
        return img
    # Resize(method=crop|pad): fastai picks the scale from the limiting side, centre at validation.
    take_w = (w / tw < h / th) if spec.method == "crop" else (w / tw > h / th)
    m = w / tw if take_w else h / th
    cp = (int(m * tw), int(m * th))
    tl = (int(0.5 * (w - cp[0])), int(0.5 * (h - cp[1])))
    return _crop_pad(img, cp, tl, orig, spec, spec.size)


def to_input_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resized RGB image -> float32 CHW array, scaled and normalised as fastai's batch transforms do."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(spec.div)
    if spec.mean is not None and spec.std is not None:
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess_batch(images: list[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """RGB images of any size -> one (N, 3, H, W) float32 batch."""
    return np.stack([to_input_array(resize_like_fastai(im, spec), spec) for im in images])
