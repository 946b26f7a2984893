"""Label audit and one turn of the spiral on digits with 10 % of the labels flipped (issue 8's targets).

Per seed (0 and 1), in one run and on the SAME out-of-fold probabilities:
* the noisy dataset is the demo's training split (1,437 digits, rendered as model.demo does) with 10 % of the
  labels flipped to another class; the demo's held-out split (360 digits, true labels) is the clean test set;
* out-of-fold probabilities: review.audit.out_of_fold, K folds, the demo's recipe (the product's code path);
* Loupe's queue (review.audit.label_scores: likely issues ranked by label quality) against cleanlab's
  ``find_label_issues`` (default filter, ranked by self-confidence): top-N precision and recall (N = flipped),
  reviews needed to find 90 % of the flipped labels, against random order;
* every label-quality score of review.scoring, ranked the same way (what the queue's score was chosen on);
* one turn of the spiral through the product: the audit's rows logged (review.audit.queue_records), a reviewer
  who knows the truth decides the first M items on the review desk, ``model.retrain.retrain`` fine-tunes the
  model trained on the noisy labels; clean held-out accuracy before and after, at M = N and M = 2N;
* scoring speed with the serving predictor (the demo's ONNX bundle through the prediction pipeline), warm.

cleanlab is a benchmark-only dependency: ``pip install -r bench/requirements.txt``.
Run: ``python -m bench.label_audit`` (about 25-60 minutes on a shared 2-core box; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import CACHE, check, summary, table

FLIP = 0.10


def noisy_digits(seed: int, images_dir: Path, limit: int | None):
    """(base images with noisy labels, true labels, flipped mask, clean images, clean labels)."""
    from model.demo import _split, render
    from review.imagestore import ImageStore
    from review.trainset import BaseImage
    from serving.imageio import encode_for_storage, image_stats

    digits, train, valid = _split()
    if limit:
        train, valid = train[:limit], valid[: max(limit // 4, 50)]
    store = ImageStore(images_dir)
    rng = np.random.RandomState(seed)
    n = len(train)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, size=int(FLIP * n), replace=False)] = True
    base, truth = [], []
    for k, i in enumerate(train):
        img = render(digits.data[i])
        png = encode_for_storage(img)
        true = int(digits.target[i])
        given = (true + rng.randint(1, 10)) % 10 if flipped[k] else true
        base.append(BaseImage(store.put_bytes(png), str(given), f"digits:{i}", image_stats(img), len(png)))
        truth.append(str(true))
    clean = [render(digits.data[i]) for i in valid]
    return base, np.array(truth), flipped, clean, [str(digits.target[i]) for i in valid]


def ranking_figures(order: np.ndarray, flipped: np.ndarray) -> dict:
    n_flip = int(flipped.sum())
    top = order[:n_flip]
    found = np.cumsum(flipped[order]) if len(order) else np.zeros(0)
    need = int(np.ceil(0.9 * n_flip))
    reach = int(np.searchsorted(found, need) + 1) if len(found) and found[-1] >= need else None
    return {"queued": int(len(order)), "top_n_precision": float(flipped[top].sum() / n_flip),
            "top_n_precision_of_listed": float(flipped[top].mean()) if len(top) else float("nan"),
            "recall_in_queue": float(flipped[order].sum() / n_flip), "reviews_for_90": reach}


def random_reviews_for_90(n: int, n_flip: int) -> float:
    """Expected position of the ceil(0.9 N)-th flipped label in a uniformly random order: k (n + 1) / (N + 1)."""
    return int(np.ceil(0.9 * n_flip)) * (n + 1) / (n_flip + 1)


def clean_accuracy(predictor, images, labels) -> float:
    p = predictor.predict_probs(images)
    return float(np.mean(np.array(predictor.info.vocab)[p.argmax(axis=1)] == np.array(labels)))


def spiral(work: Path, seed: int, base, truth, probs, vocab, recipe, reviews: dict[str, int], clean, clean_labels):
    """One noisy model, then per M: log the audit, review the first M queue items truthfully, retrain."""
    from model import versions
    from model.retrain import retrain
    from review import audit
    from review.desk import ReviewDesk
    from review.store import ReviewStore
    from settings import Settings

    folder = work / "noisy"  # the base dataset as a user would have it: class folders (noisy labels)
    for b in base:
        path = folder / b.label / f"{b.sha256}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "images" / b.sha256[:2] / f"{b.sha256}.png", path)
    out = {}
    noisy_export = None
    for tag, m in reviews.items():
        settings = Settings(_env_file=None, data_dir=work / tag, backend="onnx")
        store = ReviewStore(settings)
        try:
            if noisy_export is None:  # the model trained on the noisy labels, once, with the same recipe
                noisy = retrain(settings, store, base=str(folder), overrides=recipe.to_dict(), from_scratch=True,
                                progress=False).record
                noisy_export = (noisy.export_path(settings.data_dir).resolve(), noisy)
                out["before"] = clean_accuracy(versions.load_predictor(noisy, settings), clean, clean_labels)
            path, noisy = noisy_export
            now = store.clock()
            rec = store.transaction(lambda s, p=path, n=noisy, t=now: versions.register(
                s, name=n.name, sha256=n.sha256, path=p, vocab=n.vocab, now=t, recipe=n.recipe,
                metrics=n.metrics, data=n.data))
            store.transaction(lambda s, v=rec.version, t=now: versions.set_status(s, v, "current", now=t))
            info = audit.ModelInfo(f"{noisy.name}-oof", "0" * 52 + f"{seed:012d}", tuple(vocab), "oof")
            store.register_model(info)
            for b in base:  # the audited images are in the store, as an audit leaves them
                store.images.put_bytes((work / "images" / b.sha256[:2] / f"{b.sha256}.png").read_bytes())
            quality, issues = audit.label_scores(base, vocab, probs)
            audit.queue_records(store, info, base, probs, quality, issues)
            desk = ReviewDesk(store)
            by_sha = {b.sha256: t for b, t in zip(base, truth, strict=True)}
            done = 0
            while done < m and (item := desk.next_item("bench", reason="dataset")) is not None:
                true = by_sha[item.image_sha256]
                ok = item.predicted == true
                desk.decide("bench", item.item_id, action="confirm" if ok else "relabel", label=None if ok else true,
                            idempotency_key=f"{tag}-{item.item_id}")
                done += 1
            new = retrain(settings, store, base=str(folder), progress=False).record
            out[tag] = {"reviews": done, "relabelled": new.data["relabelled"],
                        "accuracy": clean_accuracy(versions.load_predictor(new, settings), clean, clean_labels)}
        finally:
            store.close()
    return out


def scoring_speed(base, images_dir: Path, work: Path) -> dict:
    """Images/s of the served demo model through the prediction pipeline (what import-dataset runs), warm."""
    from model.loading import load_predictor
    from review.store import ReviewStore
    from serving.pipeline import Input, Pipeline
    from serving.router import ModelRouter
    from settings import Settings

    settings = Settings(_env_file=None, data_dir=work / "speed", intra_op_threads=1)
    predictor = load_predictor(settings)
    store = ReviewStore(settings)
    try:
        pipeline = Pipeline.from_settings(settings, ModelRouter(predictor), store)
        data = [(images_dir / b.sha256[:2] / f"{b.sha256}.png").read_bytes() for b in base]
        rates = []
        for _ in range(3):  # the first pass warms up; report the best of the warm ones
            start = time.perf_counter()
            for i in range(0, len(data), 32):
                pipeline.predict([Input(d, "dataset", log=False) for d in data[i:i + 32]])
            rates.append(len(data) / (time.perf_counter() - start))
    finally:
        store.close()
    return {"pipeline_images_per_s": max(rates[1:]), "first_pass": rates[0], "backend": predictor.info.backend}


def run_seed(seed: int, args, recipe) -> dict:
    from cleanlab.filter import find_label_issues

    from review import audit, scoring

    work = CACHE / "label-audit" / f"seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    base, truth, flipped, clean, clean_labels = noisy_digits(seed, work / "images", args.limit)
    vocab = tuple(str(d) for d in range(10))
    from review.imagestore import ImageStore

    folds = audit.fold_ids([b.sha256 for b in base], [b.label for b in base], args.folds, seed)
    t0 = time.perf_counter()
    probs, train_s, oof_rate = audit.out_of_fold(base, ImageStore(work / "images"), vocab, recipe, folds,
                                                 progress=not args.quiet)
    oof_wall = time.perf_counter() - t0
    labels = np.array([int(b.label) for b in base])
    n, n_flip = len(base), int(flipped.sum())
    quality, issues = audit.label_scores(base, vocab, probs)
    queued = np.flatnonzero(issues)
    loupe = ranking_figures(queued[np.argsort(quality[queued], kind="stable")], flipped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cl_order = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
        cl_both = find_label_issues(labels, probs, filter_by="both", return_indices_ranked_by="self_confidence")
    methods = {}
    for method in scoring.LABEL_QUALITY_METHODS:
        q = scoring.label_quality(labels, probs, method)
        methods[method] = {"queue": ranking_figures(queued[np.argsort(q[queued], kind="stable")], flipped),
                           "all": ranking_figures(np.argsort(q, kind="stable"), flipped)}
    cl_only = scoring.likely_label_issues(labels, probs)
    out = {"seed": seed, "n": n, "flipped": n_flip, "n_clean": len(clean), "oof_accuracy_vs_truth": float(np.mean(
        probs.argmax(axis=1) == truth.astype(int))), "oof_seconds": oof_wall, "oof_train_seconds": train_s,
        "oof_scoring_images_per_s": oof_rate, "loupe": loupe,
        "cleanlab": ranking_figures(np.asarray(cl_order), flipped),
        "cleanlab_both": ranking_figures(np.asarray(cl_both), flipped),
        "confident_learning_only": ranking_figures(np.flatnonzero(cl_only), flipped),
        "random_reviews_for_90": random_reviews_for_90(n, n_flip), "methods": methods}
    if not args.no_spiral:
        out["spiral"] = spiral(work, seed, base, truth, probs, vocab, recipe,
                               {"M=N": n_flip, "M=2N": 2 * n_flip}, clean, clean_labels)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.label_audit", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, help="use only this many training digits (smoke runs)")
    p.add_argument("--no-spiral", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--quick", action="store_true", help="--limit 300 --folds 3 --epochs 3 --seeds 0")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.folds, args.epochs, args.seeds = 300, 3, 3, [0]
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    from model.train import DEMO_RECIPE

    recipe = replace(DEMO_RECIPE, epochs=args.epochs)
    results = [run_seed(s, args, recipe) for s in args.seeds]
    speed = scoring_speed(*_speed_inputs(args))

    print("\n== Label audit: Loupe's queue vs cleanlab, same out-of-fold probabilities ==")
    rows = []
    for r in results:
        for name in ("loupe", "cleanlab", "cleanlab_both", "confident_learning_only"):
            f = r[name]
            rows.append([r["seed"], name, r["flipped"], f["queued"], f["top_n_precision"],
                         f["top_n_precision_of_listed"], f["recall_in_queue"], f["reviews_for_90"] or "not reached",
                         f"{(f['reviews_for_90'] or float('nan')) / r['flipped']:.2f} N"])
        rows.append([r["seed"], "random order", r["flipped"], r["n"], "", "", "", f"{r['random_reviews_for_90']:.0f}",
                     f"{r['random_reviews_for_90'] / r['flipped']:.2f} N"])
    table(["seed", "queue", "N", "queued", "prec@N", "prec(listed)", "recall", "reviews 90%", "/ N"], rows)
    print("\n== Label-quality scores, each ranking Loupe's queued items (and, for information, every item) ==")
    rows = [[r["seed"], m, f["queue"]["top_n_precision"], f["queue"]["reviews_for_90"] or "-",
             f["all"]["top_n_precision"], f["all"]["reviews_for_90"] or "-"]
            for r in results for m, f in r["methods"].items()]
    table(["seed", "score", "prec@N (queue)", "reviews 90% (queue)", "prec@N (all)", "reviews 90% (all)"], rows)
    print("\n== Out of fold ==")
    table(["seed", "OOF accuracy vs truth", "OOF wall s", "fold scoring img/s"],
          [[r["seed"], r["oof_accuracy_vs_truth"], r["oof_seconds"], r["oof_scoring_images_per_s"]] for r in results])
    if not args.no_spiral:
        print("\n== One turn of the spiral: clean held-out accuracy ==")
        table(["seed", "noisy model", "M=N reviews", "after M=N", "M=2N reviews", "after M=2N"],
              [[r["seed"], r["spiral"]["before"], r["spiral"]["M=N"]["reviews"], r["spiral"]["M=N"]["accuracy"],
                r["spiral"]["M=2N"]["reviews"], r["spiral"]["M=2N"]["accuracy"]] for r in results])
    print(f"\nscoring speed (demo, {speed['backend']}, pipeline, warm): {speed['pipeline_images_per_s']:.0f} img/s "
          f"(first pass {speed['first_pass']:.0f})\n")
    for r in results:
        s = r["seed"]
        check(f"seed {s}: Loupe top-N precision", r["loupe"]["top_n_precision"], 0.93, ">=", "")
        check(f"seed {s}: Loupe / cleanlab top-N precision",
              r["loupe"]["top_n_precision"] / max(r["cleanlab"]["top_n_precision"], 1e-9), 1.0, ">=")
        check(f"seed {s}: reviews to find 90% / N", (r["loupe"]["reviews_for_90"] or np.inf) / r["flipped"], 1.0,
              "<=")
        if not args.no_spiral:
            n_clean = r["n_clean"]
            for tag in ("M=N", "M=2N"):  # strictly better: at least one more clean held-out image right
                gained = round((r["spiral"][tag]["accuracy"] - r["spiral"]["before"]) * n_clean)
                check(f"seed {s}: clean images gained, {tag} (of {n_clean})", gained, 1, ">=", "")
    check("scoring speed, warm (img/s)", speed["pipeline_images_per_s"], 500, ">=", "")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "speed": speed}, indent=2, default=str))
    return summary()


def _speed_inputs(args):
    work = CACHE / "label-audit" / f"seed{args.seeds[0]}"
    base, *_ = noisy_digits(args.seeds[0], work / "images", args.limit)
    return base, work / "images", work


if __name__ == "__main__":
    raise SystemExit(main())
