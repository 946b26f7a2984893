"""``python -m model.calibrate <folder|labels.csv|demo>``: compute the served model's reference data.

For an export without Loupe's training data (your own ``learn.export()``): give it the labelled images the model
was trained or validated on (a folder of class folders, or a labels.csv; review/dataset.py), ideally the validation
set. At most ``--limit`` images (default 2,000, a deterministic sample by file name) are decoded exactly as uploads
are, run through the served model and measured; the result is written to
``<data dir>/models/<export sha256>/reference.json`` (model/reference.py), where the app finds it (it re-reads
a changed file without a restart). ``demo`` computes the demo model's from its own digits (see ``demo_items``).

Extending it (e.g. the unfamiliar-input detector's reference): add a section factory to ``SECTIONS``; each section
sees every batch (decoded images, labels, the model's probabilities, input statistics, the predictor) and returns
its part of the file under its own name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from model.reference import InputsSection, PredictionsSection, ReferenceError, Section, compute_reference
from model.unfamiliar import UnfamiliarSection

# (predictor) -> Section, in file order. Add yours here.
SECTIONS: tuple[Callable[[object], Section], ...] = (
    lambda predictor: PredictionsSection(tuple(predictor.info.vocab)),
    lambda predictor: InputsSection(),
    lambda predictor: UnfamiliarSection(len(predictor.info.vocab)),  # the unfamiliar-input detector
)
DEFAULT_LIMIT = 2000


def sample(files: list, limit: int) -> list:
    """At most ``limit`` files, the same ones on every run (by a hash of the path), in a stable order."""
    if len(files) <= limit:
        return files
    return sorted(files, key=lambda f: hashlib.sha256(str(f.path).encode()).hexdigest())[:limit]


def dataset_items(source: Path, settings, limit: int, rejected: list) -> tuple[int, Iterator]:
    """(count, iterator of (decoded image, label)) of a labelled folder or labels.csv, decoded like uploads."""
    from review.dataset import list_labeled
    from serving.imageio import ImageRejected, decode_image

    files = sample(list_labeled(source), limit)

    def items():
        for f in files:
            try:
                data = Path(f.path).read_bytes()
                yield decode_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels), f.label
            except (OSError, ImageRejected) as e:
                rejected.append((str(f.path), e.args[0] if isinstance(e, ImageRejected) else str(e)))

    return len(files), items()


def demo_items(limit: int | None = None) -> tuple[int, Iterator]:
    """The demo's reference images: its held-out digits as people give them to it, each in four renderings: the
    soft one at 128 px (like the examples) and pen strokes at 280 px (like a drawing on the 280 px canvas), each
    dark on light and light on dark (MNIST's convention, which the demo is trained to read: model/demo.py).

    Not its 32 px training renders: their size is an artefact of how the demo was trained, and every real input
    (an example, a drawing) would then look like a resolution shift. Both polarities: a light-on-dark digit is
    read as well as a dark one, so it must not be called unfamiliar, nor a stream of them a drift.
    """
    import numpy as np

    from model.demo import SEED, _split, invert, render, render_pen

    digits, _, valid = _split()
    rng = np.random.RandomState(SEED + 2)
    renderings = [(i, style, light) for i in valid for style in ("soft", "pen") for light in (False, True)]
    if limit is not None:
        renderings = renderings[:limit]

    def items():
        for i, style, light in renderings:
            img = render(digits.data[i], 128) if style == "soft" else render_pen(digits.data[i], rng, 280)
            yield (invert(img) if light else img), str(digits.target[i]), int(i)  # group: the source digit

    return len(renderings), items()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a folder of class folders, a labels.csv, or 'demo'")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="images at most (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, help="where to write (default: <data dir>/models/<sha256>/reference.json)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # fastai/torch import noise
    from pydantic import ValidationError

    from model.loading import ModelLoadError
    from model.progress import Progress, say
    from model.reference import reference_path, save_reference
    from review.types import ReviewError
    from settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"error: invalid configuration (LOUPE_* environment variables):\n{e}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        from review.__main__ import served_predictor
        from review.store import ReviewStore

        store = ReviewStore(settings)
        try:
            predictor, _ = served_predictor(settings, store)
        finally:
            store.close()
        rejected: list = []
        if args.source == "demo":
            total, items = demo_items(args.limit)
        else:
            total, items = dataset_items(Path(args.source), settings, args.limit, rejected)
        bar = Progress(total, "calibrate")
        doc = compute_reference(predictor, items, source=args.source,
                                sections=[make(predictor) for make in SECTIONS],
                                batch_size=args.batch_size, on_batch=bar.update)
        bar.close()
    except (ReviewError, ModelLoadError, ReferenceError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if rejected:
        say(f"warning: {len(rejected)} files could not be read as images, e.g. {rejected[0][0]}: {rejected[0][1]}")
    out = save_reference(doc, args.out or reference_path(settings.data_dir, predictor.info.sha256))
    preds = doc["sections"].get("predictions", {})
    say(f"reference for {predictor.info.version} from {doc['n_images']:,} images written to {out}")
    print(json.dumps({"path": str(out), "model": predictor.info.version, "images": doc["n_images"],
                      "rejected": len(rejected), "accuracy": preds.get("accuracy"),
                      "sections": list(doc["sections"])}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
