"""``python -m review export|audit-dataset|import-dataset|rescore|reconcile|purge|report|hash-password`` (LOUPE_* env)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from dataclasses import asdict
from pathlib import Path

from review.types import ReviewError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m review", description="Loupe review data tools.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write reviewed images + labels.csv for fastai")
    e.add_argument("out_dir", type=Path)
    e.add_argument("--folders", action="store_true", help="store images in one folder per class")
    e.add_argument("--valid-pct", type=float, default=0.2)
    a = sub.add_parser("audit-dataset", help="out-of-fold audit of a labelled folder / labels.csv (your training "
                       "set): K fresh models, each image scored by the one that did not see it; queue likely errors")
    a.add_argument("source", help="a folder of class folders, a labels.csv, or 'demo' (the demo's digits)")
    a.add_argument("--folds", type=int, default=5)
    a.add_argument("--epochs", type=int, help="default: the served model's recipe (8 for the demo's)")
    a.add_argument("--arch", help="architecture of the fold models (default: the served model's recipe)")
    a.add_argument("--size", type=int, help="image size of the fold models")
    a.add_argument("--lr", type=float)
    a.add_argument("--bs", type=int)
    a.add_argument("--classes", choices=("served", "dataset"), default="served",
                   help="audit the served model's classes (default; other labels are skipped and listed) or the "
                   "dataset's own (a retrain then adds the new ones with a new head)")
    a.add_argument("--queue", choices=("flagged", "all"), default="flagged",
                   help="queue the likely label errors (default) or every image, most suspect first")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=1, help="torch threads for training (1 is often fastest on a busy box)")
    i = sub.add_parser("import-dataset", help="score NEW labelled data with the served model; queue likely errors "
                       "(blind to labels the model was trained on: use audit-dataset for your training set)")
    i.add_argument("source", type=Path)
    i.add_argument("--batch-size", type=int, default=32)
    i.add_argument("--queue", choices=("flagged", "all"), default="flagged")
    r = sub.add_parser("rescore", help="score labelled images with the served model; queue new high-loss items")
    r.add_argument("--batch-size", type=int, default=32)
    c = sub.add_parser("reconcile", help="find image files without rows and rows without files")
    c.add_argument("--fix", action="store_true", help="delete orphan files, forget rows whose file is lost")
    c.add_argument("--grace-s", type=float, default=3600.0, help="leave orphans younger than this alone")
    g = sub.add_parser("purge", help="delete traffic older than the retention period (decisions are kept)")
    g.add_argument("--days", type=float, help="default: LOUPE_RETENTION_DAYS")
    g.add_argument("--dry-run", action="store_true")
    sub.add_parser("hash-password", help="print a password hash for LOUPE_REVIEWERS (reads the password)")
    m = sub.add_parser("report", help="write the Monitor tab's plots and figures for a period as ONE self-contained "
                       "HTML file")
    m.add_argument("--since", required=True, type=_day, help="first day (UTC), e.g. 2026-11-01")
    m.add_argument("--until", type=_day, help="day after the last (UTC); default: now")
    m.add_argument("--out", type=Path, default=Path("report.html"))
    m.add_argument("--version", help="model version whose classes, inputs and drift are shown (default: the "
                   "registry's current version, else the configured model)")
    return p


def _day(text: str):
    from datetime import UTC, datetime

    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC) if len(text) <= 10 else \
            datetime.fromisoformat(text).astimezone(UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise ReviewError("the passwords differ")
    return first


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from model.loading import ModelLoadError

    try:
        return _run(args)
    except (ReviewError, ModelLoadError) as exc:  # what the user can fix: a message, not a traceback
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2


def served_predictor(settings, store):
    """The model the app serves: the registry's current version, else the settings' model (or the demo)."""
    from model import versions
    from model.loading import load_predictor

    rec = store.transaction(versions.current, read=True)
    predictor = versions.load_predictor(rec, settings) if rec is not None else load_predictor(settings)
    store.register_model(predictor.info)
    return predictor, rec


def _audit(args, settings, store):
    from model.retrain import choose_recipe
    from review.audit import audit_dataset

    predictor, rec = served_predictor(settings, store)
    overrides = {"epochs": args.epochs, "arch": args.arch, "size": args.size, "lr": args.lr, "bs": args.bs,
                 "seed": args.seed}
    try:
        recipe = choose_recipe(rec, args.source, overrides, served_name=predictor.info.name)
    except ValueError as exc:
        raise ReviewError(str(exc)) from None
    vocab = predictor.info.vocab if args.classes == "served" else None
    return audit_dataset(store, args.source, vocab=vocab, name=predictor.info.name, recipe=recipe,
                         folds=args.folds, queue=args.queue, seed=args.seed)


def _tell(report) -> None:
    """What the user must know, on stderr (stdout keeps the JSON report)."""
    from model.progress import say

    if report.unknown_labels:
        listed = ", ".join(f"{label!r} ({n})" for label, n in sorted(report.unknown_labels.items()))
        say(f"warning: {sum(report.unknown_labels.values())} files skipped: their labels are not among the model's "
            f"classes: {listed}. Check the folder names; audit-dataset --classes dataset audits new classes.")
    if report.rejected:
        say(f"warning: {len(report.rejected)} files could not be read as images, e.g. {report.rejected[0][0]}: "
            f"{report.rejected[0][1]}")
    if report.conflicts:
        origin, label, kept = report.conflicts[0]
        say(f"warning: {len(report.conflicts)} files repeat an image already listed under another label (e.g. "
            f"{origin} as {label!r}, kept as {kept!r}); each image is audited once, with its first label.")
    if report.trained_on:
        say(f"warning: {report.trained_on} of these images were in the served model's training data; a model has "
            "learnt their labels, right or wrong, so it cannot audit them. Use: python -m review audit-dataset "
            f"{report.source} --folds 5")
    if report.disagreement is not None and report.disagreement > 0.5:
        say(f"warning: the model contradicts {report.disagreement:.0%} of the labels: it is too weak (or the data too "
            "unlike its training data) for this audit to mean much. Train the fold models longer (--epochs) or "
            "check the classes.")
    if report.already:
        say(f"{report.already:,} images were already logged with the same label by {report.model_version}: "
            "not logged again.")
    say(f"{report.queued:,} images queued for review (likely label errors, most suspect first). Review them at "
        f"{report.review_at} (Reason: dataset).")


def _run(args) -> int:
    if args.command == "hash-password":
        from review.auth import hash_password

        print(hash_password(_read_password()))
        return 0
    from pydantic import ValidationError

    from review import jobs
    from review.store import ReviewStore
    from settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        raise ReviewError(f"invalid configuration (LOUPE_* environment variables):\n{e}") from None
    if args.command == "report":
        from review.report import write_report

        print(json.dumps(write_report(settings, since=args.since, until=args.until, out=args.out,
                                      version=args.version), indent=2))
        return 0
    store = ReviewStore(settings)
    if args.command in ("audit-dataset", "import-dataset"):
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # fastai/torch import noise
    try:
        if args.command in ("import-dataset", "rescore"):
            from serving.pipeline import Pipeline
            from serving.router import ModelRouter

            predictor, _ = served_predictor(settings, store)
        if args.command == "export":
            report = asdict(jobs.export_reviewed(store, args.out_dir, folders=args.folders, valid_pct=args.valid_pct))
        elif args.command == "import-dataset":
            pipeline = Pipeline.from_settings(settings, ModelRouter(predictor), store)
            result = jobs.import_dataset(store, pipeline, args.source, batch_size=args.batch_size, queue=args.queue,
                                         progress=True)
            _tell(result)
            report = asdict(result)
        elif args.command == "audit-dataset":
            import torch

            torch.set_num_threads(args.threads)
            result = _audit(args, settings, store)
            _tell(result)
            report = asdict(result)
        elif args.command == "rescore":
            report = jobs.rescore_labelled(store, predictor, batch_size=args.batch_size)
        elif args.command == "reconcile":
            rep = jobs.reconcile(store, fix=args.fix, grace_s=args.grace_s)
            report = asdict(rep) | {"clean": rep.clean}
        else:
            rep = jobs.purge(store, days=args.days, dry_run=args.dry_run)
            report = asdict(rep) | {"images": len(rep.images), "dry_run": args.dry_run}
    finally:
        store.close()
    print(json.dumps(report, indent=2, default=str))
    # reconcile without --fix exits 1 when it found something, so a cron job or CI step can alert on it
    return 1 if args.command == "reconcile" and not (report["clean"] or report["fixed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
