"""Read a loaded fastai learner's validation-time pipeline into a ``PreprocessSpec``.

Only pipelines we can replay *exactly* are accepted; anything else raises ``Unsupported`` with a
reason, and the caller serves through the learner's own transforms instead (slower, still exact).
"""

from __future__ import annotations

import math

from model.preprocess import PreprocessSpec


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


def extract_spec(learn) -> PreprocessSpec:
    """Translate ``learn.dls``'s validation transforms into a PreprocessSpec, or raise Unsupported."""
    from fastai.vision.augment import AffineCoordTfm, RandomResizedCrop, RandTransform, Resize, ResizeMethod
    from fastai.vision.core import PILImage, PILImageBW

    types = _input_types(learn)
    if not types or any(issubclass(t, PILImageBW) for t in types) or not issubclass(types[0], PILImage):
        raise Unsupported(f"input type {types[0].__name__ if types else 'unknown'} is not a plain RGB PILImage")

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

    div, mean, std = None, None, None
    for t in learn.dls.valid.after_batch.fs:
        name = type(t).__name__
        if name == "IntToFloatTensor":
            div = float(t.div)
        elif name == "Normalize":
            if not getattr(t, "axes", (0, 2, 3)) == (0, 2, 3):
                raise Unsupported("Normalize over unusual axes")
            mean = tuple(float(v) for v in t.mean.flatten())
            std = tuple(float(v) for v in t.std.flatten())
            if len(mean) != 3 or len(std) != 3:
                raise Unsupported("Normalize statistics are not per RGB channel")
        elif isinstance(t, AffineCoordTfm):
            # At validation fastai applies the identity matrix; only a `size` would change pixels.
            if getattr(t, "size", None) is not None:
                raise Unsupported(f"{name}(size=...) resizes on the batch with grid_sample")
        elif isinstance(t, RandTransform) and t.split_idx == 0:
            continue  # training-only augmentation (lighting etc.)
        else:
            raise Unsupported(f"batch transform {name} has no exact replay")
    if div is None:
        raise Unsupported("no IntToFloatTensor batch transform")

    resample = int(resize.mode)
    size = (int(resize.size[0]), int(resize.size[1]))  # fastai stores (w, h)
    if isinstance(resize, RandomResizedCrop):
        xtra = math.ceil(max(*size) * resize.val_xtra / 8) * 8  # fastai's own formula, same float order
        return PreprocessSpec(size=size, method="rrc_valid", resample=resample,
                              val_final=(size[0] + xtra, size[1] + xtra), div=div, mean=mean, std=std)
    method = {ResizeMethod.Crop: "crop", ResizeMethod.Pad: "pad", ResizeMethod.Squish: "squish"}[resize.method]
    return PreprocessSpec(size=size, method=method, pad_mode=str(resize.pad_mode), resample=resample,
                          div=div, mean=mean, std=std)
