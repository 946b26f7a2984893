"""Read a loaded fastai learner's validation-time pipeline into a ``PreprocessSpec``.

Only pipelines we can replay *exactly* are accepted; anything else raises ``Unsupported`` with a
reason, and the caller serves through the learner's own transforms instead (slower, still exact).
"""

from __future__ import annotations

import math
from dataclasses import replace

from model.preprocess import MODES, PreprocessSpec


class Unsupported(Exception):
    """The learner's preprocessing cannot be replayed outside fastai (the message says why)."""


class NotAClassifier(Exception):
    """The export is not a single-label image classifier; Loupe refuses to serve it."""


def check_classifier(learn) -> list[str]:
    """Return the class names, or raise NotAClassifier explaining what the export is instead."""
    from fastai.losses import BaseLoss, CrossEntropyLossFlat, FocalLossFlat, LabelSmoothingCrossEntropyFlat
    from fastai.vision.core import PILImage, PILMask

    if not hasattr(learn, "dls") or not hasattr(learn, "model"):
        raise NotAClassifier(f"it holds a {type(learn).__name__}, not a fastai Learner")
    vocab = getattr(learn.dls, "vocab", None)
    if vocab is None or len(vocab) < 2 or not all(isinstance(v, str | int) for v in vocab):
        raise NotAClassifier("its DataLoaders have no flat class vocabulary (dls.vocab)")
    if getattr(learn.dls, "n_inp", 1) != 1:
        raise NotAClassifier("it takes more than one input")
    loss = learn.loss_func
    single = (CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, FocalLossFlat)
    if isinstance(loss, BaseLoss) and not isinstance(loss, single):
        raise NotAClassifier(f"its loss is {type(loss).__name__} (multi-label or regression?); "
                             "Loupe serves single-label classifiers trained with a cross-entropy loss")
    input_types = _input_types(learn)
    if input_types and not any(issubclass(t, PILImage) and not issubclass(t, PILMask) for t in input_types):
        raise NotAClassifier(f"its input type is {input_types[0].__name__}, not an image")
    return [str(v) for v in vocab]


def _input_types(learn) -> list[type]:
    # The type transform of the first input (PILImage.create, PILImageBW.create ...) names the input type.
    try:
        tfms = learn.dls.valid_ds.tfms[0].fs
    except (AttributeError, IndexError, TypeError):
        return []
    out = []
    for f in tfms:
        # fasttransform wraps PILImage.create in a plum dispatcher; the bound class is the input type.
        impls = [getattr(f, "func", f)] + [m.implementation for m in getattr(getattr(f, "encodes", None), "methods", [])]
        for impl in impls:
            owner = getattr(impl, "__self__", None)
            if isinstance(owner, type):
                out.append(owner)
                break
    return out


def extract_spec(learn) -> tuple[PreprocessSpec, list[dict]]:
    """Translate ``learn.dls``'s validation transforms into (PreprocessSpec, batch steps), or raise Unsupported.

    The PreprocessSpec is what numpy and PIL replay per image (model/preprocess.py): mode conversion, the item
    resize, ToTensor, IntToFloatTensor. The batch steps are what the ONNX graph replays on the batch, in
    fastai's order (model/graph.py): ``{"op": "resample", ...}`` (a validation-time AffineCoordTfm or
    RandomResizedCropGPU with a size) and ``{"op": "normalize", ...}``. Plain data: recorded in bundle.json.
    """
    from fastai.vision.augment import RandomResizedCrop, RandTransform, Resize, ResizeMethod
    from fastai.vision.core import PILImage

    types = _input_types(learn)
    mode = getattr(types[0], "_open_args", {}).get("mode") if types and issubclass(types[0], PILImage) else None
    if mode not in MODES:  # PILImage: RGB; PILImageBW: L (PILImage.create converts files with load_image(mode=))
        raise Unsupported(f"input type {types[0].__name__ if types else 'unknown'} is neither PILImage (RGB) "
                          "nor PILImageBW (L)")

    resize = None
    for t in learn.dls.valid.after_item.fs:
        name = type(t).__name__
        if name == "ToTensor" or (isinstance(t, RandTransform) and t.split_idx == 0):
            continue  # ToTensor is replayed by to_input_array; split_idx 0 means training only
        if isinstance(t, Resize | RandomResizedCrop) and resize is None:
            resize = t
            continue
        raise Unsupported(f"item transform {name} has no exact replay")
    if resize is None:
        raise Unsupported("no Resize/RandomResizedCrop item transform: images would keep their own size")

    resample = int(resize.mode)
    size = (int(resize.size[0]), int(resize.size[1]))  # fastai stores (w, h)
    if isinstance(resize, RandomResizedCrop):
        xtra = math.ceil(max(*size) * resize.val_xtra / 8) * 8  # fastai's own formula, same float order
        spec = PreprocessSpec(size=size, method="rrc_valid", resample=resample, val_final=(size[0] + xtra,
                              size[1] + xtra), mode=mode)
    else:
        method = {ResizeMethod.Crop: "crop", ResizeMethod.Pad: "pad", ResizeMethod.Squish: "squish"}[resize.method]
        spec = PreprocessSpec(size=size, method=method, pad_mode=str(resize.pad_mode), resample=resample, mode=mode)
    div, steps = _batch_steps(learn, spec)
    return replace(spec, div=div), steps


def _batch_steps(learn, spec: PreprocessSpec) -> tuple[float, list[dict]]:
    """IntToFloatTensor's divisor, then the validation-time batch transforms after it, as graph steps."""
    from fastai.vision.augment import AffineCoordTfm, RandomResizedCropGPU, RandTransform

    div, steps = None, []
    channels = 1 if spec.mode == "L" else 3
    shape = (channels, spec.size[1], spec.size[0])  # (C, H, W) after the item transforms
    for t in learn.dls.valid.after_batch.fs:  # already sorted by fastai's `order`
        name = type(t).__name__
        if isinstance(t, RandTransform) and t.split_idx == 0:
            continue  # training-only augmentation (lighting etc.)
        if name == "IntToFloatTensor":
            if steps:
                raise Unsupported(f"{steps[-1]['op']} runs before IntToFloatTensor")
            div = float(t.div)
        elif div is None:
            raise Unsupported(f"batch transform {name} runs before IntToFloatTensor")
        elif name == "Normalize":
            if not getattr(t, "axes", (0, 2, 3)) == (0, 2, 3):
                raise Unsupported("Normalize over unusual axes")
            mean, std = t.mean.detach().float().cpu(), t.std.detach().float().cpu()
            if mean.ndim != 4 or mean.shape[1] not in (1, shape[0]) or std.shape != mean.shape:
                raise Unsupported(f"Normalize statistics of shape {tuple(mean.shape)} for {shape[0]}-channel images")
            steps.append({"op": "normalize", "shape": list(mean.shape), "mean": mean.flatten().tolist(),
                          "std": std.flatten().tolist()})
            shape = (max(shape[0], mean.shape[1]), *shape[1:])  # stats of 3 channels broadcast a 1-channel image
        elif isinstance(t, RandomResizedCropGPU):
            shape = _add_rrc_gpu(t, shape, steps)
        elif isinstance(t, AffineCoordTfm):
            # At validation fastai applies the identity matrix and skips coord_fs (warp): only a `size` changes
            # pixels (without one, an identity resample at the same size: off by float rounding only, ~1e-7).
            if getattr(t, "size", None) is not None:
                shape = _add_resample(steps, shape, t.size, t.mode, t.pad_mode, t.align_corners, None)
        else:
            raise Unsupported(f"batch transform {name} has no exact replay")
    if div is None:
        raise Unsupported("no IntToFloatTensor batch transform")
    return div, steps


def _add_resample(steps: list[dict], shape: tuple, size, mode: str, pad_mode, align_corners, crop) -> tuple:
    out = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))  # torch order (h, w)
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise Unsupported(f"batch resize with grid_sample mode {mode!r}")
    # in_size: (h, w) before the crop; crop: [top, left, h, w] or None; size: (h, w) after.
    steps.append({"op": "resample", "in_size": list(shape[1:]), "size": list(out), "mode": str(mode),
                  "pad_mode": str(pad_mode), "align_corners": bool(align_corners),  # fastai's None: torch's False
                  "crop": crop})
    return (shape[0], *out)


def _add_rrc_gpu(t, shape: tuple, steps: list[dict]) -> tuple:
    """RandomResizedCropGPU at validation: a centre crop fixed by the (static) item size, then affine_coord(sz)
    with its defaults (identity, reflection padding, align_corners=True). Its own before_call picks the crop."""
    import torch

    t.before_call(torch.zeros(1, *shape), split_idx=1)
    crop = [int(t.tl[0]), int(t.tl[1]), int(t.cp_size[0]), int(t.cp_size[1])]  # top, left, h, w
    return _add_resample(steps, shape, t.size, t.mode, "reflection", True, crop)
