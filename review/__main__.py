"""``python -m review export|import-dataset|rescore|reconcile|purge|hash-password`` (settings from LOUPE_* env)."""

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
    i = sub.add_parser("import-dataset", help="score a labelled folder or labels.csv; queue suspected mislabels")
    i.add_argument("source", type=Path)
    i.add_argument("--batch-size", type=int, default=32)
    r = sub.add_parser("rescore", help="score labelled images with the served model; queue new high-loss items")
    r.add_argument("--batch-size", type=int, default=32)
    c = sub.add_parser("reconcile", help="find image files without rows and rows without files")
    c.add_argument("--fix", action="store_true", help="delete orphan files, forget rows whose file is lost")
    c.add_argument("--grace-s", type=float, default=3600.0, help="leave orphans younger than this alone")
    g = sub.add_parser("purge", help="delete traffic older than the retention period (decisions are kept)")
    g.add_argument("--days", type=float, help="default: LOUPE_RETENTION_DAYS")
    g.add_argument("--dry-run", action="store_true")
    sub.add_parser("hash-password", help="print a password hash for LOUPE_REVIEWERS (reads the password)")
    return p


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise ReviewError("the passwords differ")
    return first


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ReviewError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "hash-password":
        from review.auth import hash_password

        print(hash_password(_read_password()))
        return 0
    from review import jobs
    from review.store import ReviewStore
    from settings import Settings

    settings = Settings()
    store = ReviewStore(settings)
    try:
        if args.command in ("import-dataset", "rescore"):
            from model.loading import load_predictor
            from serving.pipeline import Pipeline
            from serving.router import ModelRouter

            predictor = load_predictor(settings)
            store.register_model(predictor.info)
        if args.command == "export":
            report = asdict(jobs.export_reviewed(store, args.out_dir, folders=args.folders, valid_pct=args.valid_pct))
        elif args.command == "import-dataset":
            pipeline = Pipeline.from_settings(settings, ModelRouter(predictor), store)
            report = asdict(jobs.import_dataset(store, pipeline, args.source, batch_size=args.batch_size))
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
