"""REST round trip vs in-process predict, same image, same model (resnet18 @224), interleaved.

    python -m bench.rest_overhead [--n 100] [--model resnet18]

Variants (one at a time, shuffled order each iteration; the app runs in its own process on 127.0.0.1):
  in-process     decode_image(JPEG bytes) + predictor.predict_probs([img]) in this process
  REST           POST /api/v1/predict, multipart JPEG (224 px) -> JSON, over a kept-alive connection
  Gradio         Gradio's HTTP protocol for api_name "predict": upload, call, read the event stream (info)
The app logs every prediction (its default settings); the background write competes for the CPU, as in production.
Target (issue 2 item 8): REST p50 <= in-process p50 + 10 ms.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/rest_overhead.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
import warnings

from bench.apps import App, bench_env, free_port, gradio_predict, rest_predict, workdir
from bench.common import (
    check,
    interleaved,
    jpeg_bytes,
    load,
    model_env,
    p50,
    p90,
    sample_image,
    seed_data_dir,
    summary,
    table,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "demo"])
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import httpx

    from serving.imageio import decode_image

    with workdir("loupe-bench-rest-") as tmp:
        port = free_port()
        env = bench_env(LOUPE_DATA_DIR=str(seed_data_dir(args.model, tmp / "data")), LOUPE_PORT=str(port),
                        **model_env(args.model))
        predictor = load(args.model)  # the same bundle the app serves, same thread settings (defaults)
        jpg = jpeg_bytes(sample_image(args.model, size=224))

        def inproc():
            predictor.predict_probs([decode_image(jpg, max_bytes=10 << 20, max_pixels=40_000_000)])

        with App([sys.executable, "app.py"], env, port, tmp / "app.log") as app, httpx.Client(timeout=60) as client:
            app.wait_ready()

            def rest():
                status, body = rest_predict(client, app.url, jpg)
                if status != 200:
                    raise RuntimeError(f"REST answered {status}: {body[:300]}")

            def gradio():
                ok, msg = gradio_predict(client, app.url, jpg)
                if not ok:
                    raise RuntimeError(f"Gradio call failed: {msg}")

            def noop():
                client.get(app.url + "/healthz")

            times = interleaved({"in-process": inproc, "REST": rest, "Gradio": gradio, "GET /healthz": noop}, args.n,
                                warmup=5)
            time.sleep(0.5)
        print(f"\n== {args.model}: {len(jpg)} byte JPEG (224 px), n={args.n}, interleaved")
        table(["variant", "p50 ms", "p90 ms", "min ms"], [[k, p50(v), p90(v), float(v.min())] for k, v in times.items()])
        added = p50(times["REST"]) - p50(times["in-process"])
        check("REST p50 - in-process p50", added, 10, unit=" ms")
        print(f"  info: REST / in-process = {p50(times['REST']) / p50(times['in-process']):.2f}x; Gradio protocol adds "
              f"{p50(times['Gradio']) - p50(times['in-process']):.1f} ms; an HTTP no-op (GET /healthz) costs "
              f"{p50(times['GET /healthz']):.1f} ms")
    return summary()


if __name__ == "__main__":
    raise SystemExit(main())
