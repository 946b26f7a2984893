"""Helpers shared by the hand-run benchmarks (they are scripts, not tests).

On a noisy shared 2-core machine absolute times drift from minute to minute, so every benchmark
measures its variants side by side, interleaved (a shuffled order each iteration, so noise and cache
effects hit every variant alike), and reports ratios.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("LOUPE_BENCH_CACHE", Path(tempfile.gettempdir()) / "loupe-bench-cache"))
RESNET = "rrc224_aug_imagenet"  # tests/learners.py kind: resnet18 @224, RandomResizedCrop + aug + ImageNet stats
# bench model name -> tests/learners.py kind (all trained from scratch on the fly, cached under CACHE)
KINDS = {
    "resnet18": RESNET,  # the book's bear recipe: RandomResizedCrop(224, min_scale=0.5) + aug_transforms()
    "resnet34": "rrc224_aug_imagenet_r34",  # the same recipe on resnet34
    "presize": "presize460_224_r18",  # chapter 5's presizing: Resize(460) + aug_transforms(size=224), resnet18
    "bw": "bw224_r18",  # PILImageBW, a 1-channel resnet18 @224
}
MODELS = ("demo", "resnet18")
ALL_MODELS = ("demo", *KINDS)


# ---- models ------------------------------------------------------------------------------------------
def cached_export(kind: str = RESNET) -> tuple[Path, str]:
    """A fastai export of the given tests/learners.py kind, built once and kept under CACHE/<kind>/."""
    out = CACHE / kind
    path, pin = out / "export.pkl", out / "export.sha256"
    if path.is_file() and pin.is_file():
        sha = pin.read_text().strip()
        if hashlib.sha256(path.read_bytes()).hexdigest() == sha:
            return path, sha
    print(f"[bench] building a {kind} export (once; cached in {out}) ...", flush=True)
    from tests.learners import build_learner, export_learner, make_color_dataset

    with tempfile.TemporaryDirectory(prefix="loupe-bench-data-") as tmp:
        learn = build_learner(kind, make_color_dataset(Path(tmp) / "data"))
        path, sha = export_learner(learn, out)
    pin.write_text(sha)
    return path, sha


def model_file(model: str) -> tuple[Path, str]:
    """(export.pkl, sha256) for "demo" (the embedded model) or a name in KINDS."""
    if model == "demo":
        from model.demo import DEMO_EXPORT, DEMO_SHA256

        if not DEMO_EXPORT.is_file():
            raise FileNotFoundError(f"demo model not built yet: {DEMO_EXPORT} (python -m model.demo)")
        return DEMO_EXPORT, DEMO_SHA256
    if model not in KINDS:
        raise FileNotFoundError(f"unknown bench model {model!r}; known: demo, {', '.join(KINDS)}")
    return cached_export(KINDS[model])


def model_env(model: str) -> dict[str, str]:
    if model == "demo":
        return {}
    path, sha = model_file(model)
    return {"LOUPE_MODEL_PATH": str(path), "LOUPE_MODEL_SHA256": sha}


def available_models(wanted=MODELS) -> list[str]:
    out = []
    for m in wanted:
        try:
            model_file(m)
            out.append(m)
        except FileNotFoundError as e:
            print(f"[bench] SKIP {m}: {e}")
    return out


def data_dir(model: str) -> Path:
    """A data dir whose cache holds this model's serving bundle (built by the first load_predictor)."""
    return CACHE / f"data-{model}"


def settings_for(model: str, data: Path | None = None, **overrides):
    from settings import Settings

    kw = {"data_dir": data or data_dir(model), **overrides}
    if model != "demo":
        path, sha = model_file(model)
        kw.update(model_path=path, model_sha256=sha, model_name=model)
    return Settings(**kw)


def load(model: str, **overrides):
    """Loupe's predictor for the model, the way main() loads it (bundle cached under data_dir(model))."""
    from model.loading import load_predictor

    return load_predictor(settings_for(model, **overrides))


def seed_data_dir(model: str, dest: Path) -> Path:
    """A fresh data dir (no database) whose cache already holds the bundle: a 'later start'."""
    load(model)  # builds the bundle once if needed
    shutil.copytree(data_dir(model) / "cache", dest / "cache", dirs_exist_ok=True)
    return dest


# ---- images ------------------------------------------------------------------------------------------
def sample_image(model: str = "resnet18", seed: int = 0, size: int | None = None) -> Image.Image:
    """A photo-like RGB image (smooth gradients + noise): 224 px, or 640 px for "presize" (what a Resize(460)
    presizer is meant for); demo: a held-out digit at 280 px (the Sketchpad's size). Distinct seeds give
    distinct bytes (the image store dedups identical images)."""
    rng = np.random.default_rng(seed)
    if model == "demo":
        imgs = _digits(size or 280)
        arr = np.asarray(imgs[seed % len(imgs)]).copy()
        arr[0, 0] = rng.integers(0, 256, 3)  # one pixel: unique bytes, same digit
        return Image.fromarray(arr)
    s = size or (640 if model == "presize" else 224)
    yy, xx = np.mgrid[0:s, 0:s]
    base = np.stack([xx * 255 // s, yy * 255 // s, (xx + yy) * 128 // s], -1) + rng.integers(0, 40, (s, s, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


@functools.cache
def _digits(size: int) -> list[Image.Image]:
    from model.demo import holdout_split

    return holdout_split(size)[0]


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---- timing ------------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], n: int, warmup: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """ms per call of each variant, n calls each, in a shuffled order every iteration."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(seed)
    for _ in range(n):
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: np.asarray(v) for k, v in times.items()}


def p50(x) -> float:
    return float(np.percentile(np.asarray(x), 50)) if len(x) else float("nan")


def p90(x) -> float:
    return float(np.percentile(np.asarray(x), 90)) if len(x) else float("nan")


def table(headers: list[str], rows: list[list]) -> None:
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def load_average() -> str:
    """The 1-minute load average, for every figure: on a shared box it says how much the figure is worth."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


RESULTS: list[tuple[str, bool]] = []


def check(name: str, value: float, target: float, op: str = "<=", unit: str = "x") -> bool:
    ok = value <= target if op == "<=" else value >= target
    RESULTS.append((name, ok))
    print(f"  {name:<48} {value:8.3f}{unit}  target {op} {target:g}{unit}  {'PASS' if ok else 'FAIL'}")
    return ok


def summary() -> int:
    failed = [n for n, ok in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} targets met" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
