"""The embedded demo model: a tiny fastai classifier for scikit-learn's bundled handwritten digits.

Nothing here downloads anything: the data ships with scikit-learn and the network starts from random
weights, so the demo can be rebuilt offline. The committed ``demo_artifacts/export.pkl`` is what the
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
DEMO_SHA256 = "e7aa2611309d19107409e9fa73fc1349019e9d0c6d4e87f94c8e0446601cae95"
DEMO_EXAMPLES_DIR = DEMO_EXPORT.parent / "examples"
VOCAB = tuple(str(d) for d in range(10))
SEED = 42
VALID_PCT = 0.2
PEN_FRACTION = 0.5  # share of training digits drawn as crisp pen strokes instead of soft blobs
EPOCHS = 8


@dataclass(frozen=True)
class DemoResult:
    path: Path
    sha256: str
    accuracy: float  # on the held-out split (see holdout_split)
    seconds: float  # wall time of fitting only (not imports or rendering)


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
    """The validation images (RGB PIL) and their labels ('0'..'9'), exactly as the demo held them out."""
    digits, _, valid = _split()
    return [render(digits.data[i], size) for i in valid], [str(digits.target[i]) for i in valid]


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
    for name, idx in (("train", train), ("valid", valid)):
        for i in idx:
            path = root / name / str(digits.target[i]) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Validation stays plain `render` so the held-out accuracy is measured on one fixed rendering.
            pen = name == "train" and rng.random_sample() < PEN_FRACTION
            (render_pen(digits.data[i], rng) if pen else render(digits.data[i])).save(path)
            files.append(path)
    # Sorted so the training order (hence the weights) does not depend on directory listing order.
    return sorted(files)


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
            # white margin, so uncovered areas stay paper.
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
    path = out_dir / "export.pkl"
    learn.export(path.resolve())
    from model.bundle import sha256_file  # here, not at the top: importing model.demo stays numpy-free

    return DemoResult(path=path, sha256=sha256_file(path), accuracy=acc, seconds=seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.demo",
        description="Rebuild the embedded demo model (fastai, scikit-learn digits, no downloads) with a "
        "progress bar, then print its held-out accuracy, file size and sha256. A rebuild is normally not "
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
    print(f"held-out accuracy: {result.accuracy:.4f}")
    print(f"training time:     {result.seconds:.1f} s")
    print(f"export:            {result.path} ({result.path.stat().st_size / 1e6:.2f} MB)")
    print(f"examples:          {len(examples)} in {args.out / 'examples'}")
    print(f'DEMO_SHA256 = "{result.sha256}"')


if __name__ == "__main__":
    main()
