"""Throughput under concurrent clients, and overload behaviour. resnet18 @224 export.

    python -m bench.concurrency [--clients 8] [--seconds 20] [--reps 2] [--burst 64] [--queue-size 4] [--design]

1. `--clients` closed-loop client threads (httpx), `--seconds` per phase, phases interleaved `--reps` times:
   (a) Loupe REST POST /api/v1/predict, (b) Loupe through Gradio's HTTP protocol (api_name "predict"),
   (c) bench/baseline_app.py (gr.Interface around learn.predict at torch's default threads) through Gradio's
   protocol, as its users call it. Every request sends a distinct 224 px JPEG (Loupe stores each new image in
   the background, as in production). For information: (d) Loupe REST with LOUPE_STORE_UPLOADS=false, and CPU
   per request of server and client; with --design, the two simpler thread plans Loupe could use instead
   (LOUPE_MODEL_WORKERS=1: one session with every core for every batch; LOUPE_INTRA_OP_THREADS=1: 1-thread
   lanes only, never every core).
   Targets: Loupe REST throughput >= 3x the baseline's (issue 7 item 15), Loupe via Gradio >= 1.5x (issue 2);
   no request fails.
2. Overload: a Loupe app with LOUPE_QUEUE_MAX_SIZE=--queue-size; `--burst` clients fire one request each at
   the same instant (3 bursts). Target: the excess gets a fast, clear "busy" (HTTP 503, p50 < 100 ms), and every
   admitted request succeeds. The same burst through Gradio's protocol is reported for information.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/concurrency.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import resource
import time
from collections import Counter

from bench.apps import App, bench_env, cpu_seconds, free_port, gradio_predict, rest_predict, workdir
from bench.common import (
    check,
    load_average,
    model_env,
    p50,
    p90,
    seed_data_dir,
    summary,
    table,
)
from bench.load import Images, burst, closed_loop, multipart_request, raw_burst
from bench.startup import start_baseline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--burst", type=int, default=64)
    ap.add_argument("--queue-size", type=int, default=4)
    ap.add_argument("--overload-only", action="store_true", help="skip the throughput phases")
    ap.add_argument("--design", action="store_true", help="also measure the two simpler thread plans (info)")
    args = ap.parse_args(argv)
    with workdir("loupe-bench-conc-") as tmp:
        print("generating images ...", flush=True)
        imgs = Images(4000)

        def start_loupe(name: str, **extra: str) -> App:
            port = free_port()
            env = bench_env(LOUPE_DATA_DIR=str(seed_data_dir("resnet18", tmp / name)), LOUPE_PORT=str(port),
                            **model_env("resnet18"), **extra)
            return App([sys.executable, "app.py"], env, port, tmp / f"{name}.log")

        if not args.overload_only:
            throughput(args, tmp, imgs, start_loupe)
        overload(args, tmp, imgs, start_loupe)
    return summary()


def throughput(args, tmp: Path, imgs: Images, start_loupe) -> None:
    loupe, nostore = start_loupe("loupe"), start_loupe("loupe-nostore", LOUPE_STORE_UPLOADS="false")
    base = start_baseline("resnet18", tmp)
    apps = [loupe, nostore, base]
    if args.design:
        wide, narrow = start_loupe("loupe-wide", LOUPE_MODEL_WORKERS="1"), start_loupe("loupe-narrow",
                                                                                     LOUPE_INTRA_OP_THREADS="1")
        apps += [wide, narrow]
    try:
        for app in apps:
            app.wait_ready()

        def rest(app):
            def call(c):
                status, body = rest_predict(c, app.url, imgs.next())
                return status == 200, f"HTTP {status} {body}"
            return call

        phases = {  # name -> (client call, server process)
            "loupe REST": (rest(loupe), loupe),
            "loupe Gradio": (lambda c: gradio_predict(c, loupe.url, imgs.next()), loupe),
            "baseline Gradio": (lambda c: gradio_predict(c, base.url, imgs.next()), base),
            "loupe REST, uploads not stored": (rest(nostore), nostore),  # info: what storing images costs
        }
        if args.design:  # info: the thread plans not chosen (model/predictor.ThreadPlan)
            phases["loupe REST, 1 worker x every core"] = (rest(wide), wide)
            phases["loupe REST, 1-thread lanes only"] = (rest(narrow), narrow)
        for name, (call, _) in phases.items():  # warm-up: first inference, thread pools
            closed_loop(call, 2, 2)
            print(f"warmed up {name}", flush=True)
        res = {k: [0, [], [], 0.0, 0.0] for k in phases}  # ok, errors, latencies, server CPU s, client CPU s
        order = list(phases)
        for r in range(args.reps):
            for k in (order if r % 2 == 0 else order[::-1]):
                call, app = phases[k]
                server0, client0 = cpu_seconds(app.proc.pid), _self_cpu()
                ok, errs, lat = closed_loop(call, args.clients, args.seconds)
                client1 = _self_cpu()
                time.sleep(3)  # Loupe's background log writer drains; its CPU counts for this phase
                for i, v in enumerate((ok, errs, lat, cpu_seconds(app.proc.pid) - server0, client1 - client0)):
                    res[k][i] += v
                print(f"rep {r + 1}: {k}: {ok / args.seconds:.1f}/s, {len(errs)} failed; {load_average()}", flush=True)
        total = args.seconds * args.reps
        print(f"\n== {args.clients} concurrent clients, {args.reps} x {args.seconds:.0f} s per variant, interleaved "
              "(CPU ms per request: server process incl. its log writer; client = this process's threads)")
        table(["variant", "req/s", "ok", "failed", "p50 ms", "p90 ms", "server CPU ms/req", "client CPU ms/req"],
              [[k, v[0] / total, v[0], len(v[1]), p50(v[2]), p90(v[2]), v[3] * 1000 / max(v[0], 1),
                v[4] * 1000 / max(v[0], 1)] for k, v in res.items()])
        for k, v in res.items():
            for msg, n in Counter(v[1]).most_common(3):
                print(f"  {k} failure x{n}: {msg}")
        b = res["baseline Gradio"][0]
        for k, target in (("loupe REST", 3.0), ("loupe Gradio", 1.5)):
            check(f"{k} throughput / baseline", res[k][0] / max(b, 1), target, op=">=")
            check(f"{k}: failed requests", len(res[k][1]), 0, unit="")
        for k in phases:
            if k not in ("loupe REST", "loupe Gradio", "baseline Gradio"):
                print(f"  info: {k} / baseline = {res[k][0] / max(b, 1):.2f}x ({len(res[k][1])} failed)")
        print(f"  info: not storing uploads (LOUPE_STORE_UPLOADS=false) changes REST throughput by "
              f"{res['loupe REST, uploads not stored'][0] / max(res['loupe REST'][0], 1):.2f}x")
    finally:
        for app in apps:
            app.stop()


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def overload(args, tmp: Path, imgs: Images, start_loupe) -> None:
    small = start_loupe("loupe-small-queue", LOUPE_QUEUE_MAX_SIZE=str(args.queue_size))
    try:
        small.wait_ready()

        def grad(c):
            good, msg = gradio_predict(c, small.url, imgs.next())
            return "ok" if good else ("busy" if "queue is full" in msg.lower() else f"error {msg[:80]}")

        closed_loop(lambda c: (rest_predict(c, small.url, imgs.next())[0] == 200, ""), 2, 2)  # warm-up
        print(f"\n== overload: {args.burst} simultaneous requests, LOUPE_QUEUE_MAX_SIZE={args.queue_size}, 3 bursts; "
              f"{load_average()}")
        rows = []
        for name in ("REST", "Gradio"):
            if name == "REST":
                res = [o for _ in range(3) for o in raw_burst(small.port, [multipart_request(small.port, imgs.next())
                                                                           for _ in range(args.burst)])]
            else:
                res = [o for _ in range(3) for o in burst(grad, small.url, args.burst)]
            busy = [ms for o, ms in res if o == "busy"]
            ok = [ms for o, ms in res if o == "ok"]
            other = [o for o, _ in res if o not in ("ok", "busy")]
            rows.append([name, len(res), len(ok), len(busy), len(other), p50(busy), max(busy, default=float("nan")),
                         p50(ok), max(ok, default=float("nan"))])
            for msg, n in Counter(other).most_common(3):
                print(f"  {name} other outcome x{n}: {msg}")
            time.sleep(2)
        table(["path", "requests", "ok", "busy", "other", "busy p50 ms", "busy max ms", "ok p50 ms", "ok max ms"], rows)
        r = rows[0]
        check("overload REST: busy answers (count)", r[3], 1, op=">=", unit="")
        check("overload REST: time to busy p50", r[5], 100, unit=" ms")
        check("overload REST: neither ok nor busy (count)", r[4], 0, unit="")
    finally:
        small.stop()


if __name__ == "__main__":
    raise SystemExit(main())
