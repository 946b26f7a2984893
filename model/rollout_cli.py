"""The rollout commands of ``python -m model.versions`` (model.versions_cli.main wires them in): thin wrappers around
model.rollout, the same functions the Models tab calls. Exit codes: 0 done, 2 error, 3 the gate refused."""

from __future__ import annotations

import getpass
import json
import sys

from model import rollout, versions

COMMANDS = ("shadow", "canary", "stop", "disagreements", "seen", "gate", "promote", "rollback", "history")


def _by(p) -> None:
    p.add_argument("--by", default=None, help="your name, recorded with the action (default: your login name)")


def add_commands(sub) -> None:
    s = sub.add_parser("shadow", help="the version scores every live request beside the current model, unseen")
    s.add_argument("version")
    s.add_argument("--note", default="")
    _by(s)
    c = sub.add_parser("canary", help="the version answers a share of the browser sessions (sticky)")
    c.add_argument("version")
    c.add_argument("--share", type=float, default=None, help="fraction of sessions (default LOUPE_CANARY_SHARE)")
    c.add_argument("--note", default="")
    _by(c)
    st = sub.add_parser("stop", help="end the shadow or canary: the candidate goes back to candidate")
    _by(st)
    d = sub.add_parser("disagreements", help="shadow disagreements with the current model not looked at yet")
    d.add_argument("version")
    d.add_argument("--limit", type=int, default=50)
    se = sub.add_parser("seen", help="record that you looked at the disagreements listed, up to --upto")
    se.add_argument("version")
    se.add_argument("--upto", type=int, required=True, help="the last disagreement id you looked at")
    _by(se)
    g = sub.add_parser("gate", help="what the promotion gate says about the version now (changes nothing)")
    g.add_argument("version")
    pr = sub.add_parser("promote", help="make the version current, through the gate; you confirm")
    pr.add_argument("version")
    pr.add_argument("--yes", action="store_true", help="confirm without the prompt")
    pr.add_argument("--override", default=None,
                    help="promote although the gate refused; your reason is recorded and logged as a warning")
    pr.add_argument("--note", default="")
    _by(pr)
    r = sub.add_parser("rollback", help="the previous current version serves again (one command)")
    r.add_argument("--note", default="")
    _by(r)
    sub.add_parser("history", help="the latest rollout actions: who did what, when")


def _say(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(args, settings, store) -> int:
    """Run one rollout command; raises model.versions.VersionError for mistakes (main prints them)."""
    by = getattr(args, "by", None) or getpass.getuser()
    cmd = args.command
    if cmd == "shadow":
        rec = rollout.start_shadow(store, args.version, actor=by, note=args.note)
        print(f"{rec.version} runs in shadow; replicas follow within {settings.rollout_poll_s:g} s.")
    elif cmd == "canary":
        share = args.share if args.share is not None else settings.canary_share
        rec = rollout.start_canary(store, args.version, share=share, actor=by, note=args.note)
        print(f"{rec.version} answers {share:.0%} of the sessions; replicas follow within {settings.rollout_poll_s:g} s.")
    elif cmd == "stop":
        rec = rollout.stop(store, actor=by)
        print(f"{rec.version} is a plain candidate again." if rec else "No candidate was in shadow or canary.")
    elif cmd == "disagreements":
        rows = rollout.unseen_disagreements(store, args.version, limit=args.limit)
        for r in rows:
            path = store.images.path(r["image_sha256"]) if r["image_sha256"] else "(image not stored)"
            print(f"#{r['id']}  served {r['served_label']!r}, candidate {r['predicted']!r} "
                  f"({r['confidence']:.2f})  {path}")
        if rows:
            print(f"Looked at them? python -m model.versions seen {args.version} --upto {rows[-1]['id']}")
        else:
            print("No disagreements left to look at.")
    elif cmd == "seen":
        n = rollout.mark_seen(store, args.version, upto=args.upto, actor=by)
        print(f"Recorded: {by} looked at {n} disagreements of {args.version}.")
    elif cmd == "gate":
        result = rollout.check_gate(store, settings, args.version, rollout.loader(settings))
        print(result.text())
        return 0 if result.passed else 3
    elif cmd == "promote":
        return _promote(args, settings, store, by)
    elif cmd == "rollback":
        done = rollout.rollback(store, actor=by, note=args.note)
        print(f"Rolled back: {done.record.version} is current again"
              f" ({done.replaced.version if done.replaced else 'nothing'} retired); replicas follow within "
              f"{settings.rollout_poll_s:g} s.")
    else:
        _say(rollout.history(store))
    return 0


def _promote(args, settings, store, by: str) -> int:
    load = rollout.loader(settings)
    result = rollout.check_gate(store, settings, args.version, load)
    print(result.text())
    if not result.passed and not args.override:
        print("Refused. Fix what failed, or pass --override 'your reason' (recorded, loud).", file=sys.stderr)
        return 3
    confirmed = args.yes
    if not confirmed:
        if not sys.stdin.isatty():
            raise versions.VersionError("confirm with --yes (no terminal to ask)")
        answer = input(f"Promote {result.candidate} as {by}? Type the version to confirm: ")
        confirmed = answer.strip() == result.candidate
        if not confirmed:
            print("Not confirmed; nothing changed.", file=sys.stderr)
            return 2
    try:
        done = rollout.promote(store, settings, args.version, actor=by, confirmed=confirmed, load=load,
                               override=args.override, note=args.note)
    except rollout.GateRefused as e:  # something changed since the gate above ran
        print(e.result.text(), file=sys.stderr)
        return 3
    flag = f" OVER A FAILED GATE ({args.override})" if done.override else ""
    print(f"Promoted {done.record.version}{flag}; {done.replaced.version if done.replaced else 'nothing'} retired. "
          f"Replicas follow within {settings.rollout_poll_s:g} s. Undo: python -m model.versions rollback")
    return 0
