"""Validation-time preprocessing of a fastai image learner, replayed with PIL and numpy.

``learn.predict`` runs fastai's validation pipeline: the input type's mode conversion (``PILImage``: RGB,
``PILImageBW``: L), an item transform that resizes (``Resize`` with crop/pad/squish, or ``RandomResizedCrop``'s
validation branch), ``ToTensor`` and ``IntToFloatTensor``; then the batch transforms (a batch resize,
``Normalize``), which live in the ONNX graph (model/graph.py). Every geometric step below copies fastai's
``crop_pad`` arithmetic (including its integer truncation and torchvision's padding) so that the served pixels
are the very pixels the learner would see; the golden tests hold us to 1e-4 on the probabilities. Nothing here
imports torch or fastai: a server with a cached bundle never does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

METHODS = ("crop", "pad", "squish", "rrc_valid")
MODES = ("RGB", "L")  # PILImage, PILImageBW
PAD_MODES = {"zeros": "constant", "border": "edge", "reflection": "reflect"}


@dataclass(frozen=True)
class PreprocessSpec:
    """What fastai does to one image before its batch transforms, as plain data (JSON-serialisable)."""

    size: tuple[int, int]  # final (width, height)
    method: str  # one of METHODS
    pad_mode: str = "reflection"  # one of PAD_MODES (fastai names)
    resample: int = int(Image.Resampling.BILINEAR)
    val_final: tuple[int, int] | None = None  # rrc_valid: squish to this size, then centre-crop to `size`
    div: float = 255.0
    mode: str = "RGB"  # the input type's PIL mode: one of MODES

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown image mode {self.mode!r}")
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
    arr = np.asarray(img)
    arr = np.pad(arr, ((top, bottom), (left, right), *([(0, 0)] if arr.ndim == 3 else [])), mode)
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
    """The item transform at validation time: a PIL image in ``spec.mode`` in, one of ``spec.size`` out."""
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
    """Resized image -> float32 CHW array, scaled as fastai's ToTensor + IntToFloatTensor do."""
    x = np.asarray(img, dtype=np.uint8)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return np.ascontiguousarray(x.astype(np.float32) / np.float32(spec.div), dtype=np.float32)


def preprocess_batch(images: list[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Images of any size and mode -> one (N, C, H, W) float32 batch (C: 3 for RGB, 1 for L), the graph's input.

    Mode conversion is PIL's, as PILImageBW.create's ``load_image(mode='L')`` does (ITU-R 601-2 luma)."""
    return np.stack([to_input_array(resize_like_fastai(im if im.mode == spec.mode else im.convert(spec.mode), spec),
                                    spec) for im in images])
