"""Tiny fastai learners built on the fly, one per kind of export Loupe must serve exactly.

Every learner trains on one or two batches of a small synthetic 3-class folder dataset
(images of varied sizes and aspect ratios, so crop/pad/squish really differ) and is exported
with ``learn.export`` like a user would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("blue", "green", "red")


def make_color_dataset(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """A folder-per-class dataset: each image is mostly its class colour, with noise and a stripe."""
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(40, 260)), int(rng.integers(40, 260))
            arr = rng.integers(0, 90, size=(h, w, 3))
            arr[..., 2 - ci] += 150  # CLASSES sorted: blue=channel 2, green=1, red=0
            arr[:, : w // 5] = rng.integers(0, 255, size=3)  # a stripe that crop/pad treat differently
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _tiny_cnn(n_out: int, n_in: int = 3):
    from fastai.vision.all import ConvLayer, Flatten, nn

    return nn.Sequential(ConvLayer(n_in, 8, stride=2), ConvLayer(8, 16, stride=2), ConvLayer(16, 16, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(16, n_out))


KINDS = {
    # The fastai book's bear-classifier recipe, from scratch.
    "rrc224_aug_imagenet": dict(item="rrc", size=224, arch="resnet18", aug=True, norm=True),
    "pad224": dict(item="pad", size=224, arch="tiny", aug=False, norm=False),
    "squish224": dict(item="squish", size=224, arch="tiny", aug=False, norm=True),
    "crop_nonsquare_96x160": dict(item="crop", size=(96, 160), arch="tiny", aug=True, norm=False),
    # Presizing (the book's chapter 5), small: Resize(160) per item, then aug_transforms(size=64) resizes the
    # batch (AffineCoordTfm(size): identity grid_sample at validation, after an area pre-pass since 160/64 > 2).
    "presize_160to64": dict(item="crop", size=160, arch="tiny", aug="presize", batch_size=64, norm=True),
    # The same with min_scale < 1, as the book writes it: RandomResizedCropGPU (a centre crop, then grid_sample).
    "presize_rrcgpu_80to64": dict(item="squish", size=80, arch="tiny", aug="presize_rrc", batch_size=64,
                                  norm=False),
    # Single-channel input: PILImageBW (files converted to "L"), a 1-channel model, 1-channel Normalize stats.
    "bw_48": dict(item="crop", size=48, arch="tiny", aug=False, norm="bw", bw=True),
    # An item transform with no exact replay: must fall back to the exact torch path.
    "croppad_fallback": dict(item="croppad", size=64, arch="tiny", aug=False, norm=False),
    # Bench only (bench/predict_latency.py): the book's recipes at full size.
    "rrc224_aug_imagenet_r34": dict(item="rrc", size=224, arch="resnet34", aug=True, norm=True),
    "presize460_224_r18": dict(item="crop", size=460, arch="resnet18", aug="presize", batch_size=224, norm=True),
    "bw224_r18": dict(item="rrc", size=224, arch="resnet18", aug=True, norm="bw", bw=True),
}


def build_learner(kind: str, data: Path):
    """A freshly trained (1 short epoch) learner of the given kind."""
    from fastai.vision.all import (
        CropPad,
        ImageDataLoaders,
        Learner,
        Normalize,
        PILImage,
        PILImageBW,
        RandomResizedCrop,
        Resize,
        ResizeMethod,
        accuracy,
        aug_transforms,
        imagenet_stats,
        resnet18,
        resnet34,
        set_seed,
        vision_learner,
    )

    k = KINDS[kind]
    set_seed(0)
    item = {
        "rrc": lambda s: RandomResizedCrop(s, min_scale=0.5),
        "pad": lambda s: Resize(s, method=ResizeMethod.Pad, pad_mode="zeros"),
        "squish": lambda s: Resize(s, method=ResizeMethod.Squish),
        "crop": lambda s: Resize(s),
        "croppad": lambda s: CropPad(s),
    }[k["item"]](k["size"])
    batch = []
    if k["aug"] == "presize":
        batch += aug_transforms(size=k["batch_size"])
    elif k["aug"] == "presize_rrc":
        batch += aug_transforms(size=k["batch_size"], min_scale=0.75)
    elif k["aug"]:
        batch += aug_transforms()
    if k["norm"] == "bw":
        batch.append(Normalize.from_stats([0.45], [0.25]))
    elif k["norm"]:
        batch.append(Normalize.from_stats(*imagenet_stats))
    n_in = 1 if k.get("bw") else 3
    dls = ImageDataLoaders.from_folder(data, valid_pct=0.25, seed=0, item_tfms=item, batch_tfms=batch, bs=6,
                                       num_workers=0, img_cls=PILImageBW if k.get("bw") else PILImage)
    if k["arch"] in ("resnet18", "resnet34"):
        arch = resnet18 if k["arch"] == "resnet18" else resnet34
        learn = vision_learner(dls, arch, pretrained=False, metrics=accuracy, n_in=n_in)
    else:
        learn = Learner(dls, _tiny_cnn(dls.c, n_in), metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    return learn


def export_learner(learn, out: Path) -> tuple[Path, str]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "export.pkl"
    learn.export(path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def golden_images(seed: int = 1) -> list[Image.Image]:
    """Test images unlike the probe images used at conversion time: other sizes, colours, textures."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h in [(224, 224), (500, 375), (375, 500), (33, 250), (250, 33), (96, 160), (2, 2), (1000, 20)]:
        arr = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
        arr[: h // 2, :, rng.integers(0, 3)] = 230
        out.append(Image.fromarray(arr, "RGB"))
    return out


def labels_of(path):  # no return annotation: fasttransform would try to cast to list[str]
    """Multi-label target (importable, so the export loads): the folder name as a one-element list."""
    return [Path(path).parent.name]


def build_multilabel_learner(data: Path):
    """A multi-label learner (sigmoid outputs): an export Loupe must refuse to serve as single-label."""
    from fastai.vision.all import DataBlock, ImageBlock, Learner, MultiCategoryBlock, Resize, get_image_files

    dls = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_items=get_image_files, get_y=labels_of,
                    item_tfms=Resize(32)).dataloaders(data, bs=6, num_workers=0)
    learn = Learner(dls, _tiny_cnn(dls.c))
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    return learn


def build_trained_color_learner(data: Path):
    """A user's own small 3-class learner that has really learned its classes (the other kinds here train for one
    short epoch: enough to test preprocessing, not to give features that mean anything). ~3 s."""
    from fastai.vision.all import (
        ImageDataLoaders,
        Learner,
        Normalize,
        Resize,
        ResizeMethod,
        accuracy,
        imagenet_stats,
        set_seed,
    )

    set_seed(0)
    dls = ImageDataLoaders.from_folder(data, valid_pct=0.25, seed=0, item_tfms=Resize(64, method=ResizeMethod.Squish),
                                       batch_tfms=[Normalize.from_stats(*imagenet_stats)], bs=8, num_workers=0)
    learn = Learner(dls, _tiny_cnn(dls.c), metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(8, 1e-2)
    return learn
