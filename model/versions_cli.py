"""``python -m model.versions list | show <version> | compare <a> <b>`` (read-only), and the rollout commands
(model.rollout_cli: shadow, canary, stop, disagreements, seen, gate, promote, rollback, history).

Mistakes (an unknown version, a refused rollout step, a model file this machine cannot reach) are one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy.orm import Session

from model.versions import VersionError, VersionRecord, compare, get, list_versions, located, summary


def _table(records: list[VersionRecord]) -> str:
    lines = [f"{'version':<34} {'status':<9} {'error':>7} {'images':>7}  {'created':<19}  parent"]
    for r in records:
        s = summary(r)
        err = "-" if s["error_rate"] is None else f"{s['error_rate']:.4f}"
        lines.append(f"{r.version:<34} {r.status:<9} {err:>7} {s['images'] or '-':>7}  "
                     f"{r.created.strftime('%Y-%m-%d %H:%M:%S'):<19}  {r.parent or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.versions",
                                description="List, show and compare model versions; roll them out (model.rollout).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered version, oldest first")
    s = sub.add_parser("show", help="one version: metrics, data snapshot, report files")
    s.add_argument("version", help="version string or a sha256 prefix")
    c = sub.add_parser("compare", help="two versions side by side")
    c.add_argument("a")
    c.add_argument("b")
    from model import rollout_cli

    rollout_cli.add_commands(sub)  # shadow, canary, stop, disagreements, seen, gate, promote, rollback, history
    args = p.parse_args(argv)

    from model.loading import ModelLoadError
    from review.store import ReviewStore
    from settings import Settings

    settings = Settings()
    store = ReviewStore(settings)
    try:
        def need(s: Session, v: str) -> VersionRecord:
            rec = get(s, v)
            if rec is None:
                raise VersionError(f"unknown model version {v!r} (see: python -m model.versions list)")
            return rec

        if args.command in rollout_cli.COMMANDS:
            return rollout_cli.run(args, settings, store)
        if args.command == "list":
            print(_table(store.transaction(list_versions, read=True)))
        elif args.command == "show":
            rec = located(store.transaction(lambda s: need(s, args.version), read=True), settings)
            out = {**summary(rec), "sha256": rec.sha256, "path": str(rec.export_path(settings.data_dir)),
                   "vocab": list(rec.vocab), "metrics": rec.metrics, "data": rec.data, "recipe": rec.recipe,
                   "report": str(rec.report_dir(settings.data_dir))}
            print(json.dumps(out, indent=2, default=str))
        else:
            a, b = store.transaction(lambda s: (need(s, args.a), need(s, args.b)), read=True)
            print(json.dumps(compare(a, b), indent=2, default=str))
    except (VersionError, ModelLoadError) as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0
