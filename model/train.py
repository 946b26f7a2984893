"""The training recipe, shared by the out-of-fold dataset audit and by retraining: items -> DataLoaders ->
learner -> fit -> probabilities and metrics. ``python -m model.train`` retrains the served model (model.retrain).

Items are ``(png path, label)`` pairs of images already decoded the way serving decodes them (serving.imageio:
EXIF orientation applied, modes converted) and stored as lossless PNGs, so the model trains on the very pixels it
will be asked about. The DataBlock only uses importable fastai pieces (``ItemGetter``, ``IndexSplitter``), so an
export loads anywhere fastai does, and ``learn.predict`` / Loupe's torch path accept raw image bytes.

Augmentation is fastai's ``aug_transforms`` (the book's), with the recipe's parameters; the demo digits use the
demo's own (no flips, zoom out and in, 'border' padding: a mirrored 2 is no digit).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("xresnet-tiny", "resnet18", "resnet34", "xresnet18", "xresnet34")
ITEM_TFMS = ("crop", "squish", "pad", "rrc")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a trained model besides its data and initial weights; recorded with each version."""

    arch: str = "xresnet-tiny"  # ARCHS; all start from random weights (pretrained=False: nothing downloaded)
    size: int = 32  # square side the images are resized to
    item_tfm: str = "crop"  # ITEM_TFMS: fastai Resize method, or RandomResizedCrop(size, min_scale=0.5)
    epochs: int = 8
    lr: float = 1e-2
    bs: int = 64
    flip: bool = False
    max_rotate: float = 10.0
    min_zoom: float = 0.7
    max_zoom: float = 1.3
    max_warp: float = 0.0
    pad_mode: str = "border"
    mean: tuple[float, float, float] | None = IMAGENET_MEAN  # None: no Normalize
    std: tuple[float, float, float] | None = IMAGENET_STD
    valid_pct: float = 0.2
    seed: int = 42

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.item_tfm not in ITEM_TFMS:
            raise ValueError(f"unknown item transform {self.item_tfm!r}; choose one of {', '.join(ITEM_TFMS)}")
        if self.epochs < 1 or self.bs < 1 or self.size < 8 or not 0.0 <= self.valid_pct < 1.0:
            raise ValueError("epochs and bs must be >= 1, size >= 8, valid_pct within [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})


# The demo model's recipe (model.demo.train_demo): digits at 32 px, a quarter-width XResNet.
DEMO_RECIPE = Recipe()
# The fastai book's recipe for photos (bears): resnet18 at 224 px, aug_transforms() defaults, from scratch.
BOOK_RECIPE = Recipe(arch="resnet18", size=224, item_tfm="rrc", epochs=10, lr=2e-3, bs=32, flip=True,
                     max_rotate=10.0, min_zoom=1.0, max_zoom=1.1, max_warp=0.2, pad_mode="reflection")


@dataclass(frozen=True)
class Item:
    path: Path  # a PNG as serving would decode it (see the module docstring)
    label: str
    sha256: str  # the stored image's sha256 (review.imagestore naming)
    source: str = "dataset"  # where the label comes from (review.trainset.SOURCES)


@dataclass
class Evaluation:
    """The validation split's view of a trained learner."""

    vocab: tuple[str, ...]
    probs: np.ndarray  # (N, C)
    targets: np.ndarray  # (N,) class index
    items: list[Item] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return float((self.probs.argmax(axis=1) != self.targets).mean()) if len(self.targets) else float("nan")

    def confusion(self) -> np.ndarray:
        """(actual, predicted) counts."""
        c = len(self.vocab)
        out = np.zeros((c, c), dtype=np.int64)
        np.add.at(out, (self.targets, self.probs.argmax(axis=1)), 1)
        return out

    def metrics(self) -> dict:
        cm = self.confusion()
        tp = np.diag(cm).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(cm.sum(axis=0) > 0, tp / cm.sum(axis=0), np.nan)
            recall = np.where(cm.sum(axis=1) > 0, tp / cm.sum(axis=1), np.nan)
        per_class = {c: {"precision": _num(precision[i]), "recall": _num(recall[i]), "support": int(cm[i].sum())}
                     for i, c in enumerate(self.vocab)}
        return {"error_rate": _num(self.error_rate), "accuracy": _num(1 - self.error_rate),
                "n_valid": int(len(self.targets)), "per_class": per_class, "confusion": cm.tolist()}


def _num(x: float) -> float | None:
    return None if x is None or np.isnan(x) else round(float(x), 6)


def valid_mask(items: Sequence[Item], valid_pct: float) -> np.ndarray:
    """The fixed validation split, the export's is_valid (review.export.valid_split): a hash of the image content,
    so an image stays on its side across runs, retrains and exports, except that every class of two images or
    more keeps one on each side (fastai cannot validate on a class it never trained on)."""
    from review.export import valid_split

    return valid_split([it.sha256 for it in items], [it.label for it in items], valid_pct)


def dataloaders(items: Sequence[Item], vocab: Sequence[str], recipe: Recipe, valid_idx: Sequence[int], *,
                bs: int | None = None):
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        IndexSplitter,
        ItemGetter,
        Normalize,
        RandomResizedCrop,
        Resize,
        ResizeMethod,
        aug_transforms,
    )

    if recipe.item_tfm == "rrc":
        item_tfms = RandomResizedCrop(recipe.size, min_scale=0.5)
    else:
        method = {"crop": ResizeMethod.Crop, "squish": ResizeMethod.Squish, "pad": ResizeMethod.Pad}[recipe.item_tfm]
        item_tfms = Resize(recipe.size, method=method)
    batch_tfms = list(aug_transforms(do_flip=recipe.flip, max_rotate=recipe.max_rotate, min_zoom=recipe.min_zoom,
                                     max_zoom=recipe.max_zoom, max_warp=recipe.max_warp, size=None,
                                     pad_mode=recipe.pad_mode))
    if recipe.mean is not None and recipe.std is not None:
        batch_tfms.append(Normalize.from_stats(list(recipe.mean), list(recipe.std)))
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=list(vocab))), get_x=ItemGetter(0),
                      get_y=ItemGetter(1), splitter=IndexSplitter(list(valid_idx)), item_tfms=item_tfms,
                      batch_tfms=batch_tfms)
    # num_workers=0: worker processes cost more than they save on small images, and keep runs reproducible.
    return block.dataloaders([(str(it.path), it.label) for it in items], bs=bs or recipe.bs, num_workers=0,
                             shuffle=True)


def fresh_model(recipe: Recipe, n_out: int):
    from fastai.vision.all import ResBlock, XResNet, create_vision_model, resnet18, resnet34, xresnet18, xresnet34

    if recipe.arch == "xresnet-tiny":  # model.demo.build_model's architecture with any number of classes
        return XResNet(ResBlock, 1, [1, 1, 1, 1], widen=0.25, n_out=n_out)
    arch = {"resnet18": resnet18, "resnet34": resnet34, "xresnet18": xresnet18, "xresnet34": xresnet34}[recipe.arch]
    return create_vision_model(arch, n_out, pretrained=False)


def adapt_head(model, old_vocab: Sequence[str], new_vocab: Sequence[str]):
    """A deep copy of ``model`` whose last Linear layer answers ``new_vocab``: rows of classes it already knew are
    kept, new classes start from fresh rows (a reviewer added a class: new head, same body)."""
    import torch
    from torch import nn

    model = copy.deepcopy(model)
    if list(old_vocab) == list(new_vocab):
        return model
    name, last = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == len(old_vocab):
            name, last = n, m
    if last is None:
        raise ValueError(f"no final Linear layer with {len(old_vocab)} outputs to give the new classes a head")
    head = nn.Linear(last.in_features, len(new_vocab), bias=last.bias is not None)
    with torch.no_grad():
        for j, cls in enumerate(new_vocab):
            if cls in old_vocab:
                i = list(old_vocab).index(cls)
                head.weight[j] = last.weight[i]
                if last.bias is not None:
                    head.bias[j] = last.bias[i]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], head)
    return model


def learner(dls, recipe: Recipe, model=None):
    from fastai.vision.all import CrossEntropyLossFlat, Learner, error_rate

    return Learner(dls, model if model is not None else fresh_model(recipe, len(dls.vocab)),
                   loss_func=CrossEntropyLossFlat(), metrics=error_rate)


def fit(learn, recipe: Recipe, *, title: str = "train", progress: bool = True, epochs: int | None = None,
        lr: float | None = None) -> float:
    """fit_one_cycle with a progress line per epoch; returns the wall time of fitting in seconds."""
    from model.progress import fit_progress

    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit_one_cycle(epochs or recipe.epochs, lr or recipe.lr, cbs=[fit_progress(title, enabled=progress)])
    return time.perf_counter() - start


def seed_everything(recipe: Recipe) -> None:
    from fastai.vision.all import set_seed

    set_seed(recipe.seed, reproducible=True)


def predict_paths(learn, paths: Sequence[Path], *, bs: int = 128) -> np.ndarray:
    """Validation-time probabilities (no augmentation) for image files, in order."""
    if not paths:
        return np.zeros((0, len(learn.dls.vocab)), dtype=np.float32)
    dl = learn.dls.test_dl([str(p) for p in paths], bs=bs, num_workers=0)
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probs, _ = learn.get_preds(dl=dl)
    return probs.float().numpy()


def evaluate(learn, items: Sequence[Item], vocab: Sequence[str]) -> Evaluation:
    index = {c: i for i, c in enumerate(vocab)}
    probs = predict_paths(learn, [it.path for it in items])
    return Evaluation(tuple(vocab), probs, np.array([index[it.label] for it in items], dtype=np.int64),
                      list(items))


def train(items: Sequence[Item], vocab: Sequence[str], recipe: Recipe, *, valid: np.ndarray | None = None,
          init=None, title: str = "train", progress: bool = True):
    """Train on ``items`` (``valid`` marks the validation split; default: the recipe's fixed hash split).
    ``init``: a model to start from (fine-tuning), else fresh weights. Returns (learner, seconds)."""
    seed_everything(recipe)
    valid = valid_mask(items, recipe.valid_pct) if valid is None else np.asarray(valid, bool)
    if valid.all():
        raise ValueError("every image is in the validation split; nothing to train on")
    dls = dataloaders(items, vocab, recipe, np.flatnonzero(valid).tolist())
    learn = learner(dls, recipe, init)
    return learn, fit(learn, recipe, title=title, progress=progress)


def recipe_for_parent(learn, recipe: Recipe) -> Recipe:
    """Fine-tuning must feed images as the parent saw them: take its size, resize method and normalisation."""
    from model.spec import Unsupported, extract_spec

    try:
        spec, steps = extract_spec(learn)
    except Unsupported:
        return recipe
    method = {"rrc_valid": "rrc", "crop": "crop", "squish": "squish", "pad": "pad"}[spec.method]
    norm = next((s for s in steps if s["op"] == "normalize"), None)
    resamples = [s for s in steps if s["op"] == "resample"]
    # Presizing (a batch resize after the item resize): the model saw the batch resize's size.
    size = max(resamples[-1]["size"]) if resamples else max(spec.size)
    return replace(recipe, size=int(size), item_tfm=method, mean=tuple(norm["mean"]) if norm else None,
                   std=tuple(norm["std"]) if norm else None)


if __name__ == "__main__":
    from model.retrain import main

    raise SystemExit(main())
