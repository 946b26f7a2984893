"""Start-up time and peak memory: Loupe's app vs `import gradio, fastai.vision.all` vs a learn.predict app.

    python -m bench.startup [--runs 3] [--models demo resnet18]

1. First start, empty data dir (the bundle is converted; torch and fastai are imported): time to ready.
2. `--runs` rounds, interleaved (the order rotates each round): wall time of
   `python -c "import gradio, fastai.vision.all"`, and of each Loupe app (data dir whose cache already holds
   the bundle, a free port) from process start to the first 200 from GET /healthz.
3. Peak RSS (VmHWM) of each app after it answered 3 predictions through Gradio's protocol, Loupe vs
   bench/baseline_app.py (gr.Interface around learn.predict) on the same model (measured once: RSS is not noisy).
Targets (issue 2 items 2, 5): ready <= 0.6x the import time (median of the per-round ratios); peak RSS <= 0.6x the baseline app's;
demo first start <= 60 s, later starts <= 15 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/startup.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics

from bench.apps import App, bench_env, free_port, gradio_predict, run_measured, workdir
from bench.common import (
    ROOT,
    available_models,
    check,
    jpeg_bytes,
    model_env,
    model_file,
    sample_image,
    summary,
    table,
)

IMPORTS = [sys.executable, "-c", "import gradio, fastai.vision.all"]


def start_loupe(model: str, data: Path, logs: Path) -> App:
    port = free_port()
    env = bench_env(LOUPE_DATA_DIR=str(data), LOUPE_PORT=str(port), **model_env(model))
    return App([sys.executable, "app.py"], env, port, logs / f"loupe-{model}-{port}.log")


def start_baseline(model: str, logs: Path) -> App:
    port = free_port()
    env = bench_env(BASELINE_MODEL_PATH=str(model_file(model)[0]), BASELINE_PORT=str(port))
    return App([sys.executable, str(ROOT / "bench" / "baseline_app.py")], env, port, logs / f"base-{model}-{port}.log")


def ready_and_rss(app: App, model: str, warm: int = 3) -> tuple[float, float]:
    """(seconds to ready, peak RSS MiB after `warm` predictions)."""
    import httpx

    with app:
        ready = app.wait_ready()
        jpg = jpeg_bytes(sample_image(model))
        with httpx.Client(timeout=120) as client:
            for _ in range(warm):
                ok, msg = gradio_predict(client, app.url, jpg)
                if not ok:
                    raise RuntimeError(f"prediction failed: {msg}\n{app.tail()}")
        return ready, app.rss_peak()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (median reported; default %(default)s)")
    ap.add_argument("--models", nargs="+", default=["demo", "resnet18"])
    args = ap.parse_args(argv)
    models = available_models(args.models)
    with workdir("loupe-bench-startup-") as tmp:

        first: dict[str, float] = {}
        for m in models:  # empty data dir: converts the export, then this dir serves every later start
            first[m], _ = ready_and_rss(start_loupe(m, tmp / f"data-{m}", tmp), m, warm=1)
            print(f"first start (empty cache), {m}: ready in {first[m]:.1f} s", flush=True)

        ready: dict[str, list[float]] = {"import gradio+fastai": []} | {f"loupe {m}": [] for m in models}
        rss: dict[str, list[float]] = {k: [] for k in ready}
        steps = list(ready)
        for r in range(args.runs):
            for k in steps[r % len(steps):] + steps[: r % len(steps)]:  # rotate the order each round
                if k.startswith("import"):
                    wall, peak = run_measured(IMPORTS, bench_env())
                else:
                    m = k.split()[1]
                    wall, peak = ready_and_rss(start_loupe(m, tmp / f"data-{m}", tmp), m)
                ready[k].append(wall)
                rss[k].append(peak)
            print(f"round {r + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in ready.items()), flush=True)
        for m in models:
            ready[f"baseline {m}"], rss[f"baseline {m}"] = map(list, zip(ready_and_rss(start_baseline(m, tmp), m),
                                                                         strict=True))

        print(f"\n== start-up: median of {args.runs} interleaved runs (baseline apps: 1 run)")
        table(["process", "ready s (median)", "all runs s", "peak RSS MiB"],
              [[k, statistics.median(v), " ".join(f"{x:.1f}" for x in v), statistics.median(rss[k])]
               for k, v in ready.items()])
        for m in models:
            later = statistics.median(ready[f"loupe {m}"])
            # Paired: each round's ratio, then the median; robust to the machine's load drifting between rounds.
            ratios = [a / b for a, b in zip(ready[f"loupe {m}"], ready["import gradio+fastai"], strict=True)]
            print(f"  {m}: per-round ratios " + " ".join(f"{r:.2f}" for r in ratios))
            check(f"{m}: loupe ready / import gradio+fastai", statistics.median(ratios), 0.6)
            check(f"{m}: loupe peak RSS / learn.predict app", statistics.median(rss[f"loupe {m}"]) / rss[f"baseline {m}"][0],
                  0.6)
            if m == "demo":
                check("demo: first start (empty cache)", first[m], 60, unit=" s")
                check("demo: later start", later, 15, unit=" s")
            else:
                print(f"  info: {m} first start (empty cache: convert + verify) {first[m]:.1f} s, later start {later:.1f} s")
    return summary()


if __name__ == "__main__":
    raise SystemExit(main())
