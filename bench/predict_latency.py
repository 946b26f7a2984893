"""Per-image latency of one request, in process: learn.predict as fastai users run it vs Loupe's model path.

    python -m bench.predict_latency [--n 60] [--models demo resnet18 resnet34 presize bw]

Variants, interleaved (shuffled order every iteration), batch of one image:
  learn.predict            THE BASELINE: fastai's own path on an in-memory PIL image, inside learn.no_bar(), at
                           torch's default thread count (what a plain fastai app runs)
  learn.predict, 1 thread  for information (what this script compared against before)
  loupe                    what one request on an idle server costs in the model: the pipeline's batcher ->
                           predictor.prepare + run, Loupe's default settings (run alone: every core)
  loupe+decode             decode_image(JPEG bytes) first: what an upload costs
  loupe, lane              for information: the same image on a lane session (what each lane runs under load,
                           threads // lanes threads)
  bare ORT                 session.run on the already prepared tensor, Loupe's own session (logits + features)
  bare ORT, logits only    the same fetching only `logits`; then --pairs back-to-back pairs of the two: their
                           median difference is the cost of the `features` output (ORT computes that tensor
                           anyway, on the way to the logits: returning it is a copy)
Targets: loupe / learn.predict <= 0.75 for every model (issue 7 item 15); loupe / bare ORT <= 1.15 (resnet18, 224 px).
Models: demo (embedded), resnet18 and resnet34 (the book's RandomResizedCrop recipe @224), presize (Resize(460) +
aug_transforms(size=224), a 640 px photo), bw (PILImageBW, 1-channel resnet18 @224); see bench/common.KINDS.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/predict_latency.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
import warnings

import numpy as np

from bench.common import (
    ALL_MODELS,
    available_models,
    check,
    interleaved,
    jpeg_bytes,
    load,
    load_average,
    model_file,
    p50,
    p90,
    sample_image,
    summary,
    table,
)


def bench_model(model: str, n: int, pairs: int) -> None:
    import torch
    from fastai.learner import load_learner

    from serving.batcher import Batcher
    from serving.imageio import decode_image

    default_threads = torch.get_num_threads()  # torch's own default, as in any fastai app
    path, _ = model_file(model)
    t = time.perf_counter()
    predictor = load(model)  # Loupe's defaults (ThreadPlan: every core when alone)
    load_ms = (time.perf_counter() - t) * 1000
    torch.set_num_threads(default_threads)  # a torch fallback predictor sets it; learn.predict gets the default
    learn = load_learner(path, cpu=True)  # our own cached export / the pinned demo: trusted
    img = sample_image(model)
    bw = predictor.info.backend == "onnx" and predictor.spec.mode == "L"
    learn_img = img.convert("L") if bw else img  # PILImageBW.create converts files, not in-memory images
    jpg = jpeg_bytes(img)
    batcher = Batcher(predictor.plan.lanes)

    def learn_predict(threads: int):
        def call():
            torch.set_num_threads(threads)  # switching costs ~1 us
            try:
                learn.predict(learn_img)
            finally:
                torch.set_num_threads(default_threads)
        return call

    fns = {
        "learn.predict": learn_predict(default_threads),
        "loupe": lambda: batcher.predict(predictor, [img]),
        "loupe+decode": lambda: batcher.predict(predictor, [decode_image(jpg, max_bytes=10 << 20,
                                                                          max_pixels=40_000_000)]),
    }
    if default_threads != 1:
        fns["learn.predict, 1 thread"] = learn_predict(1)
    onnx = predictor.info.backend == "onnx"
    if onnx:
        x = predictor.prepare([img])
        sess, name = predictor._alone, predictor._input
        if predictor._lane is not predictor._alone:
            fns[f"loupe, lane ({predictor.plan.lane_threads} thread)"] = lambda: predictor.run(predictor.prepare([img]),
                                                                                            alone=False)
        fns["bare ORT"] = lambda: sess.run(None, {name: x})
        fns["bare ORT, logits only"] = lambda: sess.run(["logits"], {name: x})
    else:
        print(f"  {model}: served by torch ({predictor.info.fallback_reason}); no bare ORT variant")

    with learn.no_bar():
        served, expected = predictor.predict_probs([img])[0], np.asarray(learn.predict(learn_img)[2])
        before = load_average()
        times = interleaved(fns, n)
    print(f"\n== {model}: {sum(p.numel() for p in learn.model.parameters()) / 1e6:.1f} M params, "
          f"{img.size[0]}x{img.size[1]} input, torch default {default_threads} threads, Loupe {predictor.plan}, "
          f"n={n}, backend {predictor.info.backend}; load_predictor {load_ms:.0f} ms; "
          f"max |p_loupe - p_learn.predict| = {np.abs(served - expected).max():.1e}; {before} -> {load_average()}")
    table(["variant", "p50 ms", "p90 ms", "min ms"],
          [[k, p50(v), p90(v), float(v.min())] for k, v in times.items()])
    lp, lo, lod = p50(times["learn.predict"]), p50(times["loupe"]), p50(times["loupe+decode"])
    check(f"{model}: loupe / learn.predict ({default_threads} threads)", lo / lp, 0.75)
    info = [f"loupe+decode / learn.predict = {lod / lp:.3f}x (JPEG decode {lod - lo:.2f} ms, {len(jpg)} bytes)",
            f"by the fastest of each (what a quiet moment gives): loupe / learn.predict = "
            f"{times['loupe'].min() / times['learn.predict'].min():.3f}x"]
    if "learn.predict, 1 thread" in times:
        info.append(f"learn.predict at 1 thread / at {default_threads} = "
                    f"{p50(times['learn.predict, 1 thread']) / lp:.2f}x")
    if onnx:
        ort, ort_logits = p50(times["bare ORT"]), p50(times["bare ORT, logits only"])
        lane = [k for k in times if k.startswith("loupe, lane")]
        if lane:
            info.append(f"{lane[0]} / learn.predict at 1 thread = {p50(times[lane[0]]) / p50(times['learn.predict, 1 thread']):.3f}x")
        extra, base = features_cost(sess, name, x, pairs)
        info.append(f"features output ({_feature_width(predictor, x)} wide): {extra:+.3f} ms = {extra / base * 100:+.2f} % "
                    f"of the forward (median of {pairs} back-to-back pairs with / without fetching it; "
                    f"interleaved p50s above: {ort / ort_logits:.3f}x)")
        if model == "demo":  # a ~0.3 ms forward: any preprocessing at all dominates this ratio
            info.append(f"loupe / bare ORT = {lo / ort:.3f}x, i.e. +{lo - ort:.2f} ms of preprocessing + softmax "
                        f"around a {ort:.2f} ms forward")
        elif model == "resnet18":
            check(f"{model}: loupe / bare ORT", lo / ort, 1.15)
        else:
            info.append(f"loupe / bare ORT = {lo / ort:.3f}x (+{lo - ort:.2f} ms)")
    for line in info:
        print(f"  info: {line}")


def features_cost(sess, name: str, x, pairs: int) -> tuple[float, float]:
    """(median ms the `features` output adds, median ms without it), from back-to-back pairs in alternating
    order: each pair sees the same moment of a noisy box, so their difference is the output's own cost."""
    diffs, base = [], []
    for i in range(pairs):
        order = ((None, ["logits"]) if i % 2 else (["logits"], None))
        t = {}
        for outputs in order:
            start = time.perf_counter()
            sess.run(outputs, {name: x})
            t[outputs is None] = (time.perf_counter() - start) * 1000
        diffs.append(t[True] - t[False])
        base.append(t[False])
    return float(np.median(diffs)), float(np.median(base))


def _feature_width(predictor, x) -> int | None:
    return predictor.run(x)[1].shape[1] if predictor.has_features else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60, help="timed iterations per variant (default %(default)s)")
    ap.add_argument("--pairs", type=int, default=100, help="back-to-back pairs for the features output's cost")
    ap.add_argument("--models", nargs="+", default=list(ALL_MODELS), help="default: %(default)s")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    for model in available_models(args.models):
        bench_model(model, args.n, args.pairs)
    return summary()


if __name__ == "__main__":
    raise SystemExit(main())
