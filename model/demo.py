"""The embedded demo model: a tiny fastai classifier for scikit-learn's bundled handwritten digits.

Nothing here downloads anything: the data ships with scikit-learn and the network starts from random
weights, so the demo can be rebuilt offline. It reads dark ink on light paper (the Sketchpad) and light
ink on dark (MNIST's convention): half the training digits are inverted, and the build report gives the
held-out accuracy of each polarity. The committed ``demo_artifacts/export.pkl`` is what the
server loads; its sha256 is pinned below because loading a fastai export unpickles it (runs code).

Rebuild with ``python -m model.demo`` (see ``--help``). A rebuild always changes the sha256, so paste
the one the CLI prints into ``DEMO_SHA256`` (tests/test_demo.py fails until you do). Why: the weights
repeat exactly with the same thread count and library versions (seeds, our own split, sorted files,
no loader workers), but the file also holds the Recorder's wall-clock start time and a random
serialization id that torch.save writes; other thread counts change the float sums, hence the weights.

Heavy imports (numpy, PIL, torch, fastai, sklearn) live inside functions: the server imports the
constants below without paying for torch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

DEMO_NAME = "digits-demo"
DEMO_EXPORT = Path(__file__).parent / "demo_artifacts" / "export.pkl"
DEMO_SHA256 = "fc28e05fc7d94479ff84c3c29d749b61ae093ecec0bd681498992c1b3d77067e"
DEMO_EXAMPLES_DIR = DEMO_EXPORT.parent / "examples"
VOCAB = tuple(str(d) for d in range(10))
SEED = 42
VALID_PCT = 0.2
PEN_FRACTION = 0.5  # share of training digits drawn as crisp pen strokes instead of soft blobs
INVERT_FRACTION = 0.5  # share of training digits drawn light on dark (MNIST's convention), drawn independently
# 12, not 8: with half the digits inverted, 8 epochs left the plain held-out at 99.2% (light ink 98.6%);
# 12 give 99.7% and 99.4% (measured on this recipe, --threads 2).
EPOCHS = 12
# How the build report and the tests read the held-out digits: soft ("plain", like the examples) or crisp pen
# strokes ("pen", like a Sketchpad drawing), each dark on light and light on dark ("inverted").
HOLDOUT_RENDERINGS = ("plain", "plain inverted", "pen", "pen inverted")


@dataclass(frozen=True)
class DemoResult:
    path: Path
    sha256: str
    accuracy: float  # on the held-out split (see holdout_split), dark and light ink together
    seconds: float  # wall time of fitting only (not imports or rendering)
    holdout: dict[str, float]  # accuracy per HOLDOUT_RENDERINGS, on the whole held-out split even with a limit


def render(values, size: int = 32):
    """One 8x8 digit (ink 0..16) -> RGB image, dark ink on white paper like the UI's Sketchpad.

    The digit gets a one-cell paper margin (8x8 -> 10x10) before the bilinear upscale: the raw digits
    touch the frame, so zoom-out augmentation would smear edge ink (border padding) or mirror it
    (reflection); and people sketch with a margin. Measured: typed-font digits 0.2-0.35 -> 0.75 correct.
    """
    import numpy as np
    from PIL import Image

    ink = np.pad(np.asarray(values, dtype=np.float64).reshape(8, 8), 1)
    pixels = np.clip(np.rint(255.0 - ink * 255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")


def render_pen(values, rng, size: int = 32):
    """The same digit as crisp strokes of a random width: a Sketchpad drawing shrunk to 32 px is sharp
    black ink, unlike the soft gray blobs of ``render``. Used for part of the training split only."""
    import numpy as np
    from PIL import Image, ImageFilter

    ink = np.pad(np.asarray(values, dtype=np.float64).reshape(8, 8), 1) * (255.0 / 16.0)
    big = np.asarray(Image.fromarray(ink.astype(np.uint8), mode="L").resize((64, 64), Image.BICUBIC))
    # The threshold sets the stroke width: a low one gives a thick marker, a high one a thin pen.
    img = Image.fromarray(np.where(big > rng.uniform(0.3, 0.7) * 255, 0, 255).astype(np.uint8), mode="L")
    if rng.random_sample() < 0.3:
        img = img.filter(ImageFilter.MaxFilter(3))  # thinner still: the paper eats one pixel of ink
    return img.resize((size, size), Image.BILINEAR).convert("RGB")


def invert(img):
    """Light ink on dark paper (the MNIST convention) from dark ink on light, or back."""
    from PIL import ImageOps

    return ImageOps.invert(img)


def _split():
    """(train_idx, valid_idx) into load_digits(). Our own split rather than fastai's RandomSplitter:
    that one permutes the items in directory-listing order, which differs between filesystems."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    # RandomState (not default_rng) because numpy freezes its stream: the split never changes.
    order = np.random.RandomState(SEED).permutation(len(digits.target))
    cut = int(len(order) * VALID_PCT)
    return digits, order[cut:], order[:cut]


def holdout_split(size: int = 32):
    """The validation images (RGB PIL) and their labels ('0'..'9'), dark ink on white, exactly as the demo
    held them out (training validated on these and on their inverses)."""
    return holdout_set("plain", size)


def holdout_set(rendering: str, size: int = 32):
    """The held-out digits in one of HOLDOUT_RENDERINGS: (RGB PIL images, labels). Deterministic: the pen
    strokes come from their own seeded stream, independent of the training split's draws."""
    import numpy as np

    if rendering not in HOLDOUT_RENDERINGS:
        raise ValueError(f"unknown rendering {rendering!r}; one of {HOLDOUT_RENDERINGS}")
    digits, _, valid = _split()
    style, _, polarity = rendering.partition(" ")
    if style == "pen":
        rng = np.random.RandomState(SEED + 1)
        images = [render_pen(digits.data[i], rng, size) for i in valid]
    else:
        images = [render(digits.data[i], size) for i in valid]
    if polarity == "inverted":
        images = [invert(img) for img in images]
    return images, [str(digits.target[i]) for i in valid]


def holdout_accuracies(predict_labels) -> dict[str, float]:
    """Accuracy per held-out rendering; ``predict_labels(images) -> labels`` is any model's prediction."""
    scores = {}
    for rendering in HOLDOUT_RENDERINGS:
        images, labels = holdout_set(rendering)
        preds = predict_labels(images)
        scores[rendering] = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    return scores


def holdout_report(scores: dict[str, float]) -> str:
    """The build report's accuracy table: each held-out rendering in each polarity, and both together."""
    lines = ["held-out accuracy    dark ink   light ink   overall"]
    for style in ("plain", "pen"):
        dark, light = scores[style], scores[f"{style} inverted"]
        lines.append(f"  {style:<18} {dark:8.4f} {light:11.4f} {(dark + light) / 2:9.4f}")
    return "\n".join(lines)


def demo_examples(out_dir: Path, size: int = 128) -> list[Path]:
    """Write one held-out image per digit as ``digit_<d>.png`` (the first of each class in split order,
    not picked by how well the model does) and return their paths."""
    digits, _, valid = _split()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[int, Path] = {}
    for i in valid:
        d = int(digits.target[i])
        if d not in paths:
            paths[d] = out_dir / f"digit_{d}.png"
            render(digits.data[i], size).save(paths[d], optimize=True)
    return [paths[d] for d in sorted(paths)]


def _write_images(root: Path, limit: int | None) -> list[Path]:
    """Render the split as <root>/{train,valid}/<digit>/<i>.png so fastai's parent_label and
    GrandparentSplitter (importable library functions) label and split them: nothing in the export
    then points at code in __main__ (or in this module)."""
    import numpy as np

    digits, train, valid = _split()
    if limit is not None:  # smoke tests: a small, still-shuffled subset
        train, valid = train[:limit], valid[: max(limit // 4, 10)]
    rng = np.random.RandomState(SEED)
    files = []
    for i in train:
        pen = rng.random_sample() < PEN_FRACTION
        img = render_pen(digits.data[i], rng) if pen else render(digits.data[i])
        files.append(_save(invert(img) if rng.random_sample() < INVERT_FRACTION else img,
                           root / "train" / str(digits.target[i]) / f"{i}.png"))
    # Validation is the plain `render` in both polarities, so the per-epoch accuracy covers both.
    for i in valid:
        img = render(digits.data[i])
        folder = root / "valid" / str(digits.target[i])
        files += [_save(img, folder / f"{i}.png"), _save(invert(img), folder / f"{i}-inverted.png")]
    # Sorted so the training order (hence the weights) does not depend on directory listing order.
    return sorted(files)


def _save(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def build_model():
    """A plain nn.Module (conv, batchnorm, ReLU, pooling, linear) that ONNX export handles: an XResNet
    with one residual block per stage at a quarter width, ~0.37M parameters, a ~1.5 MB export."""
    from fastai.vision.all import ResBlock, XResNet

    return XResNet(ResBlock, 1, [1, 1, 1, 1], widen=0.25, n_out=len(VOCAB))


def train_demo(
    out_dir: Path, *, epochs: int = EPOCHS, lr: float = 1e-2, limit: int | None = None,
    progress: bool = True,
) -> DemoResult:
    """Train the demo classifier from scratch and export it to ``out_dir/export.pkl``."""
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        GrandparentSplitter,
        ImageBlock,
        Learner,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        imagenet_stats,
        parent_label,
        set_seed,
    )

    set_seed(SEED, reproducible=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loupe-digits-") as tmp:
        block = DataBlock(
            blocks=(ImageBlock, CategoryBlock(vocab=list(VOCAB))),  # fixed vocab even for a subset
            get_y=parent_label,
            splitter=GrandparentSplitter(train_name="train", valid_name="valid"),
            item_tfms=Resize(32),
            # Sketches come in any size and slightly rotated: zoom out (a small digit on a big page) and in
            # (one touching the edges). No flips (a flipped 2 is no digit); 'border' padding repeats the
            # margin, white or black, so uncovered areas stay paper in either polarity.
            batch_tfms=[
                *aug_transforms(do_flip=False, max_rotate=10, min_zoom=0.7, max_zoom=1.3, max_warp=0,
                                size=None, pad_mode="border"),
                Normalize.from_stats(*imagenet_stats),
            ],
        )
        # num_workers=0: worker processes cost more than they save on ~1,400 tiny images.
        dls = block.dataloaders(_write_images(Path(tmp), limit), bs=64, num_workers=0)
        learn = Learner(dls, build_model(), metrics=accuracy)
        start = time.perf_counter()
        if progress:
            learn.fit_one_cycle(epochs, lr)
        else:
            with learn.no_bar(), learn.no_logging():
                learn.fit_one_cycle(epochs, lr)
        seconds = time.perf_counter() - start
        with learn.no_bar():
            acc = float(learn.validate()[1])
            scores = holdout_accuracies(lambda images: _learner_labels(learn, images))
    path = out_dir / "export.pkl"
    learn.export(path.resolve())
    from model.bundle import sha256_file  # here, not at the top: importing model.demo stays numpy-free

    return DemoResult(path=path, sha256=sha256_file(path), accuracy=acc, seconds=seconds, holdout=scores)


def _learner_labels(learn, images) -> list[str]:
    probs, _ = learn.get_preds(dl=learn.dls.test_dl(images))
    return [learn.dls.vocab[i] for i in probs.argmax(dim=1).tolist()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.demo",
        description="Rebuild the embedded demo model (fastai, scikit-learn digits, no downloads) with a "
        "progress bar, then print its held-out accuracy per polarity, file size and sha256. A rebuild is normally not "
        "byte-identical: paste the printed sha256 into DEMO_SHA256 in model/demo.py.",
    )
    parser.add_argument("--out", type=Path, default=DEMO_EXPORT.parent,
                        help="directory for export.pkl and examples/ (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of fit_one_cycle (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads; on a busy machine 1 can be much faster (default: %(default)s)")
    args = parser.parse_args(argv)
    # fastai's import-time FutureWarnings (torch.jit.script) are noise for whoever runs this.
    warnings.filterwarnings("ignore", category=FutureWarning)

    import torch

    torch.set_num_threads(args.threads)
    result = train_demo(args.out, epochs=args.epochs)
    examples = demo_examples(args.out / "examples")
    print(holdout_report(result.holdout))
    print(f"training time:     {result.seconds:.1f} s")
    print(f"export:            {result.path} ({result.path.stat().st_size / 1e6:.2f} MB)")
    print(f"examples:          {len(examples)} in {args.out / 'examples'}")
    print(f'DEMO_SHA256 = "{result.sha256}"')


if __name__ == "__main__":
    main()
