"""Per-image predict latency, in process: learn.predict vs Loupe's predictor vs the bare ONNX Runtime forward.

    python -m bench.predict_latency [--n 100] [--threads 1] [--models demo resnet18]

Variants, interleaved (shuffled order every iteration), batch of one image:
  learn.predict   fastai's own path on an in-memory PIL image (inside learn.no_bar()), torch with --threads
                  (and, for information, at torch's default thread count, as a learn.predict app runs it)
  loupe           predictor.predict_probs([img]) on an in-memory RGB PIL image (decode-free)
  loupe+decode    decode_image(JPEG bytes) then predict_probs: what an upload costs
  bare ORT        session.run on the already preprocessed tensor, same ONNX file, same thread settings
Targets (issue 2 item 4, stated for resnet18 @224): loupe <= 0.6x learn.predict, loupe <= 1.15x bare ORT.
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
    available_models,
    check,
    data_dir,
    interleaved,
    jpeg_bytes,
    load,
    model_file,
    p50,
    p90,
    sample_image,
    summary,
    table,
)


def bare_session(onnx_path, threads: int):
    """An ORT session built with exactly the options OnnxPredictor uses."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def bench_model(model: str, n: int, threads: int) -> None:
    import torch
    from fastai.learner import load_learner

    from model.preprocess import preprocess_batch
    from serving.imageio import decode_image

    default_threads = torch.get_num_threads() if threads == 1 else None
    torch.set_num_threads(threads)
    path, sha = model_file(model)
    t = time.perf_counter()
    predictor = load(model, intra_op_threads=threads)
    load_ms = (time.perf_counter() - t) * 1000
    learn = load_learner(path, cpu=True)  # our own cached export / the pinned demo: trusted
    img = sample_image(model)
    jpg = jpeg_bytes(img)

    def predict_default_threads():  # as a learn.predict app runs it (torch's default; switching costs ~1 us)
        torch.set_num_threads(default_threads)
        try:
            learn.predict(img)
        finally:
            torch.set_num_threads(threads)

    fns = {
        "learn.predict": lambda: learn.predict(img),
        "loupe": lambda: predictor.predict_probs([img]),
        "loupe+decode": lambda: predictor.predict_probs([decode_image(jpg, max_bytes=10 << 20, max_pixels=40_000_000)]),
    }
    if default_threads and default_threads != threads:
        fns[f"learn.predict, {default_threads} threads"] = predict_default_threads
    if predictor.info.backend == "onnx":
        sess = bare_session(data_dir(model) / "cache" / sha / "model.onnx", threads)
        x = preprocess_batch([img], predictor.spec)
        name = sess.get_inputs()[0].name
        fns["bare ORT"] = lambda: sess.run(None, {name: x})
    else:
        print(f"  {model}: served by torch ({predictor.info.fallback_reason}); no bare ORT variant")

    with learn.no_bar():
        served, expected = predictor.predict_probs([img])[0], np.asarray(learn.predict(img)[2])
        times = interleaved(fns, n)
    print(f"\n== {model}: {sum(p.numel() for p in learn.model.parameters()) / 1e6:.1f} M params, "
          f"{img.size[0]}x{img.size[1]} input, {threads} thread(s), n={n}, backend {predictor.info.backend}; "
          f"load_predictor {load_ms:.0f} ms; max |p_loupe - p_learn.predict| = {np.abs(served - expected).max():.1e}")
    table(["variant", "p50 ms", "p90 ms", "min ms"],
          [[k, p50(v), p90(v), float(v.min())] for k, v in times.items()])
    lp, lo, lod = p50(times["learn.predict"]), p50(times["loupe"]), p50(times["loupe+decode"])
    check(f"{model}: loupe / learn.predict", lo / lp, 0.6)
    if f"learn.predict, {default_threads} threads" in times:
        print(f"  info: loupe ({threads} thread) / learn.predict at torch's default {default_threads} threads = "
              f"{lo / p50(times[f'learn.predict, {default_threads} threads']):.3f}x")
    if "bare ORT" in times:
        ort = p50(times["bare ORT"])
        if model == "demo":  # a 0.3 ms forward: any preprocessing at all dominates this ratio
            print(f"  info (target is stated for resnet18 @224): {model}: loupe / bare ORT = {lo / ort:.3f}x, i.e. "
                  f"+{lo - ort:.2f} ms of preprocessing + softmax around a {ort:.2f} ms forward")
        else:
            check(f"{model}: loupe / bare ORT", lo / ort, 1.15)
        print(f"  info: loupe+decode / learn.predict = {lod / lp:.3f}x, loupe+decode / bare ORT = "
              f"{lod / p50(times['bare ORT']):.3f}x, preprocessing+softmax = {lo - p50(times['bare ORT']):.2f} ms, "
              f"JPEG decode = {lod - lo:.2f} ms ({len(jpg)} bytes)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="timed iterations per variant (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ORT (Loupe's default: 1)")
    ap.add_argument("--models", nargs="+", default=["demo", "resnet18"])
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    for model in available_models(args.models):
        bench_model(model, args.n, args.threads)
    return summary()


if __name__ == "__main__":
    raise SystemExit(main())
