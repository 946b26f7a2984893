"""One turn of the spiral's "retrain": ``python -m model.train`` (this module's ``main``).

Base dataset + reviewed data (review.trainset) -> fine-tune the current model (or a new head when reviewers added
a class; from fresh weights with --from-scratch) -> held-out metrics and report -> ``learn.export`` into the model
store (``<data_dir>/models/<sha256>/export.pkl`` + ``report/``) -> registered as a *candidate* (model.versions).
Nothing is promoted here: the candidate goes through the rollout gate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from model import train as T
from model.progress import Progress, say


@dataclass(frozen=True)
class RetrainResult:
    record: object  # model.versions.VersionRecord
    report_dir: Path
    report: dict
    seconds: float  # wall time of the whole job


def models_dir(settings) -> Path:
    return settings.model_store_dir


def parent_version(settings, store):
    """The registry's current version; on a fresh install, the model the settings serve (registered as current)."""
    from model import versions
    from model.loading import model_source, read_pinned

    rec = store.transaction(versions.current, read=True)
    if rec is not None:
        return rec
    from model.loading import ModelLoadError, unpickle_learner
    from model.spec import NotAClassifier, check_classifier

    src = model_source(settings)
    data, digest = read_pinned(src)  # the pin is checked before anything is registered or unpickled
    try:
        vocab = check_classifier(unpickle_learner(data, src.path))
    except NotAClassifier as e:
        raise ModelLoadError(f"Model file {src.path} cannot be retrained: {e}.") from None
    return store.transaction(lambda s: versions.adopt_served(s, name=src.name, sha256=digest, path=src.path.resolve(),
                                                             vocab=vocab, now=store.clock()))


def load_learner_pinned(record, settings):
    """The parent's learner, read once and checked against the registry's sha256 before unpickling."""
    from model.loading import ModelSource, read_pinned, unpickle_learner

    src = ModelSource(record.export_path(settings.data_dir), record.sha256, record.name)
    data, _ = read_pinned(src)
    return unpickle_learner(data, src.path)


def choose_recipe(parent, base: str, overrides: dict, served_name: str | None = None) -> T.Recipe:
    """The parent's recorded recipe; the demo's for the digits; else the book's; then the caller's overrides."""
    from model.demo import DEMO_NAME

    name = parent.name if parent is not None else served_name
    if parent is not None and parent.recipe:
        recipe = T.Recipe.from_dict(parent.recipe)
    elif str(base) == "demo" or name == DEMO_NAME:
        recipe = T.DEMO_RECIPE
    else:
        recipe = T.BOOK_RECIPE
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def export_version(learn, settings) -> tuple[Path, str]:
    """learn.export into the model store, named by its sha256 (content-addressed, like images)."""
    from model.bundle import sha256_file

    root = models_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".export-{uuid.uuid4().hex}.pkl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.export(tmp.resolve())
    digest = sha256_file(tmp)
    final = root / digest / "export.pkl"
    final.parent.mkdir(exist_ok=True)
    os.replace(tmp, final)
    return final, digest


def retrain(settings, store, *, base: str, overrides: dict | None = None, name: str | None = None, note: str = "",
            from_scratch: bool = False, progress: bool = True) -> RetrainResult:
    from model import report as R
    from model import versions
    from review import trainset
    from review.imagestore import ImageStore

    start = time.perf_counter()
    parent = parent_version(settings, store)
    recipe = choose_recipe(parent, base, overrides or {})
    parent_learn = None
    if not from_scratch:
        parent_learn = load_learner_pinned(parent, settings)
        recipe = T.recipe_for_parent(parent_learn, recipe)
    base_images = ImageStore(settings.cache_dir / "trainset")
    listing = Progress(0, "reading", enabled=progress)
    base_items, base_report = trainset.load_base(base, base_images, max_bytes=settings.max_upload_bytes,
                                                 max_pixels=settings.max_pixels, progress=listing)
    listing.close(f"{base_report.images:,} images, {len(base_report.rejected)} rejected")
    people = store.transaction(lambda s: trainset.reviewed(s, store.images), read=True)
    data = trainset.assemble(base_items, base_report, base_images, people, store.images,
                             parent_vocab=None if from_scratch else parent.vocab)
    if progress:
        say(f"data: {json.dumps(data.snapshot['counts']['by_source'])}; classes: {len(data.vocab)}"
            + ("" if from_scratch or data.vocab == parent.vocab else " (new classes: a new head)"))
    init = None if from_scratch else T.adapt_head(parent_learn.model, parent.vocab, data.vocab)
    valid = T.valid_mask(data.items, recipe.valid_pct)
    learn, seconds = T.train(data.items, data.vocab, recipe, valid=valid, init=init, progress=progress)
    evaluation = T.evaluate(learn, [it for it, v in zip(data.items, valid, strict=True) if v], data.vocab)
    metrics = evaluation.metrics()
    path, digest = export_version(learn, settings)
    out = path.parent / "report"
    out.mkdir(exist_ok=True)
    R.write_data_csv(out / R.DATA_CSV, data.items, valid)
    from model.bundle import sha256_file

    snapshot = {**data.snapshot, "n_train": int((~valid).sum()), "n_valid": int(valid.sum()),
                "snapshot_sha256": sha256_file(out / R.DATA_CSV), "snapshot_file": f"report/{R.DATA_CSV}"}
    report = R.write_report(out, evaluation=evaluation, metrics=metrics, snapshot=snapshot,
                            recipe=recipe.to_dict(), seconds=seconds, parent=parent.version,
                            fine_tuned=not from_scratch)
    rel = path.relative_to(settings.data_dir) if path.is_relative_to(settings.data_dir) else path
    images = [(it.sha256, it.label, "valid" if v else "train", it.source)
              for it, v in zip(data.items, valid, strict=True)]
    record = store.transaction(lambda s: versions.register(
        s, name=name or parent.name, sha256=digest, path=rel, vocab=data.vocab, now=store.clock(),
        parent=parent.version, data=snapshot, metrics={**metrics, "train_seconds": round(seconds, 1)},
        recipe=recipe.to_dict(), note=note, training_images=images))
    return RetrainResult(record, out, report, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Retrain the current model on the base dataset plus everything reviewers settled, and register "
        "the result as a candidate (see python -m model.versions). Nothing is promoted.")
    p.add_argument("--base", default="demo", help="'demo' (the digits), a folder of class folders, or a labels.csv")
    p.add_argument("--from-scratch", action="store_true", help="fresh weights instead of fine-tuning the current model")
    p.add_argument("--name", help="version name (default: the parent's)")
    p.add_argument("--note", default="", help="a note stored with the version")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--bs", type=int)
    p.add_argument("--arch", choices=T.ARCHS, help="architecture (from scratch only; fine-tuning keeps the parent's)")
    p.add_argument("--size", type=int, help="image size (from scratch only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a busy box 1 is often fastest)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from pydantic import ValidationError

    from model.loading import ModelLoadError
    from review.store import ReviewStore
    from review.types import ReviewError
    from settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"error: invalid configuration (LOUPE_* environment variables):\n{e}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    store = ReviewStore(settings)
    try:
        overrides = {"epochs": args.epochs, "lr": args.lr, "bs": args.bs, "arch": args.arch, "size": args.size}
        result = retrain(settings, store, base=args.base, overrides=overrides, name=args.name, note=args.note,
                         from_scratch=args.from_scratch)
    except (ModelLoadError, ReviewError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    rec = result.record
    print(json.dumps({"version": rec.version, "status": rec.status, "parent": rec.parent,
                      "error_rate": rec.metrics.get("error_rate"), "data": rec.data.get("counts", {}).get("by_source"),
                      "report": str(result.report_dir), "seconds": round(result.seconds, 1)}, indent=2))
    say(f"Registered {rec.version} as a candidate. Compare it: python -m model.versions compare {rec.parent} "
        f"{rec.version}; its report is in {result.report_dir}.")
    return 0
