"""Drift alarms and monitoring cost, on the demo model. ``python -m bench.monitor_bench [--repeats 40]``

1. Detection and false-alarm rates: random windows (200 and 500 predictions) of unshifted traffic and of each shift
   at several strengths (bench/drift_streams.py), each checked against the demo's reference with the default
   thresholds. A window "alarms" when any check fires. Images are predicted and measured once; windows are samples.
2. Added cost per prediction on the request path: ``Pipeline.predict`` with the metrics observer vs without, side
   by side (interleaved rounds, same process), one image per call; plus what the log writer now measures per image
   (saturation, off the request path) and one background drift check.
"""

from __future__ import annotations

import argparse
import io
import time
import warnings

import numpy as np
from PIL import Image, ImageEnhance

from bench import drift_streams
from model.reference import measure
from review import drift

STRENGTHS = {
    "darkened": (0.9, 0.7, 0.5, 0.4),  # brightness factor
    "downscaled": (96, 64, 32, 16),  # side in px
    "flooding": (0.15, 0.25, 0.4, 0.6),  # share of one class
    "photos": (0.02, 0.05, 0.1, 0.3),  # share of photos
}


def _rows(predictor, images: list) -> dict:
    w = drift_streams.window(predictor, images)
    return {"predicted": np.array(w.predicted), "confidence": w.confidence, "width": w.width, "height": w.height,
            "brightness": w.brightness, "saturation": w.saturation}


def _take(rows: dict, idx) -> dict:
    return {k: v[idx] for k, v in rows.items()}


def _window(parts: list[tuple[dict, np.ndarray]]) -> drift.Window:
    cols = {k: np.concatenate([r[k][i] for r, i in parts]) for k in parts[0][0]}
    return drift.Window(list(cols["predicted"]), cols["confidence"], cols["width"], cols["height"],
                        cols["brightness"], cols["saturation"])


def detection(predictor, reference, repeats: int, sizes=(200, 500)) -> list[str]:
    pool_images, pool_labels = drift_streams.digit_pool()
    base = _rows(predictor, pool_images)
    ones = np.array([i for i, y in enumerate(pool_labels) if y == "1"])
    shifted = {("darkened", s): _rows(predictor, [ImageEnhance.Brightness(im).enhance(s) for im in pool_images])
               for s in STRENGTHS["darkened"]}
    shifted |= {("downscaled", s): _rows(predictor, [im.resize((s, s), Image.Resampling.BILINEAR)
                                                     for im in pool_images]) for s in STRENGTHS["downscaled"]}
    photos = _rows(predictor, drift_streams.photo_crops(600))
    th = drift.Thresholds()
    lines = ["| stream | strength | window | alarm rate | mean PSI of the check it moves |", "|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    n_pool = len(pool_images)

    def rate(make, check: str | None):
        fired, psis = 0, []
        for _ in range(repeats):
            checks = drift.compare(reference, make(), th)
            fired += any(c.status == drift.DRIFT for c in checks)
            if check:
                psis.append(next(c.psi for c in checks if c.name == check))
        return fired / repeats, (float(np.mean(psis)) if psis else float("nan"))

    for n in sizes:
        r, _ = rate(lambda n=n: _window([(base, rng.choice(n_pool, n, replace=False))]), None)
        worst = max(max(c.psi for c in drift.compare(reference, _window([(base, rng.choice(n_pool, n, replace=False))]),
                                                       th)) for _ in range(repeats))
        lines.append(f"| unshifted | – | {n} | {r:.0%} (false alarms) | highest PSI of any check: {worst:.3f} |")
        for kind, check in (("darkened", "brightness"), ("downscaled", "resolution")):
            for s in STRENGTHS[kind]:
                r, m = rate(lambda n=n, s=s, kind=kind: _window([(shifted[(kind, s)],
                                                                  rng.choice(n_pool, n, replace=False))]), check)
                lines.append(f"| {kind} | {s} | {n} | {r:.0%} | {check} {m:.3f} |")
        for s in STRENGTHS["flooding"]:
            k = int(round(n * s))
            r, m = rate(lambda n=n, k=k: _window([(base, rng.choice(ones, k)),
                                                  (base, rng.choice(n_pool, n - k, replace=False))]), "classes")
            lines.append(f"| one class flooding | {s:.0%} | {n} | {r:.0%} | classes {m:.3f} |")
        for s in STRENGTHS["photos"]:
            k = int(round(n * s))
            r, m = rate(lambda n=n, k=k: _window([(photos, rng.choice(600, k, replace=False)),
                                                  (base, rng.choice(n_pool, n - k, replace=False))]), "greyscale")
            lines.append(f"| photos | {s:.0%} | {n} | {r:.0%} | greyscale {m:.3f} |")
    return lines


class _NoLog:
    def log_prediction(self, **kw) -> str:
        return "x"


def request_cost(predictor, rounds: int = 40, per_round: int = 200) -> list[str]:
    from serving.metrics import Metrics
    from serving.pipeline import Input, Pipeline
    from serving.router import ModelRouter

    router = ModelRouter(predictor)
    plain = Pipeline(router, _NoLog(), max_bytes=10 << 20, max_pixels=40_000_000, top_k=5)
    observed = Pipeline(router, _NoLog(), max_bytes=10 << 20, max_pixels=40_000_000, top_k=5, observer=Metrics())
    images, _ = drift_streams.digit_pool()
    data = []
    for im in images[:per_round]:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        data.append(buf.getvalue())
    times = {"without": [], "with": []}
    for r in range(rounds):
        order = (("without", plain), ("with", observed)) if r % 2 else (("with", observed), ("without", plain))
        for name, pipe in order:
            for d in data:
                t = time.perf_counter()
                pipe.predict([Input(d, "upload")])
                times[name].append(time.perf_counter() - t)
    p50 = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    # what the observer itself costs, alone (the difference of two noisy medians can be negative)
    m = Metrics()
    answer = plain.predict([Input(data[0], "upload")])
    item = [Input(data[0], "upload")]
    t = time.perf_counter()
    for _ in range(20_000):
        m.observed(item, answer)
    alone = (time.perf_counter() - t) / 20_000 * 1e3
    photo = drift_streams.photo_crops(1)[0].resize((1600, 1200))
    from serving.imageio import image_stats

    def per_call(fn, img, n=300):
        t = time.perf_counter()
        for _ in range(n):
            fn(img)
        return (time.perf_counter() - t) / n * 1e3

    return ["| what | ms per prediction |", "|---|---|",
            f"| predict p50 without metrics | {p50['without']:.3f} |",
            f"| predict p50 with metrics | {p50['with']:.3f} ({(p50['with'] / p50['without'] - 1):+.1%}) |",
            f"| the metrics observer alone | {alone:.4f} ({alone / p50['without']:.2%} of predict p50) |",
            f"| writer, off the request path: brightness only (before) / brightness + saturation, 128 px digit | "
            f"{per_call(image_stats, images[0]):.3f} / {per_call(measure, images[0]):.3f} |",
            f"| same, 1600x1200 photo | {per_call(image_stats, photo):.3f} / {per_call(measure, photo):.3f} |"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.monitor_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=40, help="random windows per stream and size")
    p.add_argument("--data-dir", default="data", help="where the demo's converted bundle is cached")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from model.loading import load_predictor
    from model.reference import find_reference, load_reference
    from settings import Settings

    settings = Settings(data_dir=args.data_dir)
    predictor = load_predictor(settings)
    reference = load_reference(find_reference(settings.data_dir, predictor.info.sha256))
    print("\n".join(detection(predictor, reference, args.repeats)))
    print()
    print("\n".join(request_cost(predictor)))


if __name__ == "__main__":
    main()
