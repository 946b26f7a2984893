"""Roll a candidate out slowly: shadow, canary, promote through the gate, roll back.

One function per use case; the CLI (``python -m model.versions shadow|canary|stop|disagreements|seen|gate|promote|
rollback|history``) and the reviewer-only Models tab (ui/models_tab.py) both call these, and nothing else changes a
version's rollout status. Each change is one transaction: the registry status (model.versions.set_status, with its
history event naming the person) and a ``rollout_actions`` row (who, when, the canary share, what the gate checked,
any override). Serving follows the registry (serving.follower): this process at once (``router.refresh()``),
every other replica within ``LOUPE_ROLLOUT_POLL_S``.

Promotion: ``promote`` runs model.promotion.evaluate (the gate) itself, right before writing, and refuses when a
check fails unless the caller gives an override reason, which is recorded with the gate's findings and logged as a
warning. A person must confirm (``confirmed=True``; the CLI asks, the tab has a checkbox), and their name is recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func, select

from model import promotion, versions
from model.versions import VersionError, VersionRecord
from review.db import Prediction, RolloutAction, ShadowPrediction

log = logging.getLogger(__name__)


class RolloutError(VersionError):
    """A rollout request that cannot be done as asked; ``args[0]`` says why and what to do."""


class GateRefused(RolloutError):
    def __init__(self, result: promotion.GateResult):
        super().__init__(f"the gate refused {result.candidate}: {', '.join(result.failed)} failed "
                         "(see what it checked; promote with an override reason only if you are sure)")
        self.result = result


@dataclass(frozen=True)
class Promoted:
    record: VersionRecord  # the new current version
    replaced: VersionRecord | None  # the version it replaced (now retired)
    gate: promotion.GateResult | None  # None only for the very first current version
    override: str | None


def _actor(actor: str) -> str:
    actor = (actor or "").strip()
    if not actor:
        raise RolloutError("say who you are: rollout actions are recorded with a person's name")
    return actor[:200]


def _need(session, version: str) -> VersionRecord:
    rec = versions.get(session, version)
    if rec is None:
        raise RolloutError(f"unknown model version {version!r} (see: python -m model.versions list)")
    return rec


def _record(session, action: str, version: str, actor: str, **fields) -> None:
    session.add(RolloutAction(action=action, version=version, actor=actor, created=fields.pop("now"), **fields))


# --- shadow, canary, stop ----------------------------------------------------------------------------------------
def start_shadow(store, version: str, *, actor: str, note: str = "") -> VersionRecord:
    """``version`` scores every live request beside the current model, never shown (one candidate in a role)."""
    actor = _actor(actor)

    def write(s):
        rec = _need(s, version)
        now = store.clock()
        rec = versions.set_status(s, rec.version, "shadow", now=now, note=f"shadow, by {actor}. {note}".strip())
        _record(s, "shadow", rec.version, actor, now=now, note=note)
        return rec

    return store.transaction(write)


def start_canary(store, version: str, *, share: float, actor: str, note: str = "") -> VersionRecord:
    """``version`` answers ``share`` of the browser sessions (sticky per session), the current model the rest."""
    actor = _actor(actor)
    if not 0.0 < share <= 1.0:
        raise RolloutError("the canary share is a fraction of sessions: more than 0, at most 1 (e.g. 0.1)")

    def write(s):
        rec = _need(s, version)
        now = store.clock()
        rec = versions.set_status(s, rec.version, "canary", now=now,
                                  note=f"canary {share:.0%}, by {actor}. {note}".strip())
        _record(s, "canary", rec.version, actor, now=now, canary_share=share, note=note)
        return rec

    return store.transaction(write)


def stop(store, *, actor: str, note: str = "") -> VersionRecord | None:
    """The candidate in shadow or canary goes back to plain candidate: only the current model serves."""
    actor = _actor(actor)

    def write(s):
        rec = versions.in_role(s)
        if rec is None:
            return None
        now = store.clock()
        rec = versions.set_status(s, rec.version, "candidate", now=now, note=f"rollout stopped by {actor}. {note}".strip())
        _record(s, "stop", rec.version, actor, now=now, note=note)
        return rec

    return store.transaction(write)


def canary_share(session, version: str, default: float) -> float:
    """The share the last canary action gave ``version`` (``default`` if it was set to canary another way)."""
    share = session.scalar(select(RolloutAction.canary_share).where(
        RolloutAction.version == version, RolloutAction.action == "canary").order_by(RolloutAction.id.desc()).limit(1))
    return float(share) if share is not None else default


# --- shadow disagreements ----------------------------------------------------------------------------------------
def unseen_disagreements(store, version: str, *, limit: int = 50) -> list[dict]:
    """Disagreements of ``version`` (in shadow) with the current model that no one has marked as looked at yet,
    oldest first (so marking a page as seen covers exactly what was shown)."""
    def read(s):
        cur = versions.current(s)
        if cur is None:
            return []
        seen = s.scalar(select(func.max(RolloutAction.seen_upto)).where(
            RolloutAction.action == "seen", RolloutAction.version == version, RolloutAction.against == cur.version))
        rows = s.execute(
            select(ShadowPrediction, Prediction.image_sha256)
            .outerjoin(Prediction, Prediction.id == ShadowPrediction.prediction_id)
            .where(ShadowPrediction.model_version == version, ShadowPrediction.served_version == cur.version,
                   ShadowPrediction.agrees.is_(False), ShadowPrediction.id > (seen or 0))
            .order_by(ShadowPrediction.id).limit(limit)).all()
        return [{"id": r.id, "created": r.created, "served_version": r.served_version,
                 "served_label": r.served_label, "predicted": r.predicted, "confidence": r.confidence,
                 "image_sha256": sha} for r, sha in rows]

    return store.transaction(read, read=True)


def mark_seen(store, version: str, *, upto: int, actor: str) -> int:
    """A person has looked at ``version``'s disagreements up to shadow row ``upto`` (the last one shown to them).
    Returns how many disagreements that covers."""
    actor = _actor(actor)

    def write(s):
        rec, cur = _need(s, version), versions.current(s)
        if cur is None:
            raise RolloutError("no current version: nothing to disagree with")
        n = s.scalar(select(func.count()).select_from(ShadowPrediction).where(
            ShadowPrediction.model_version == rec.version, ShadowPrediction.served_version == cur.version,
            ShadowPrediction.agrees.is_(False), ShadowPrediction.id <= upto)) or 0
        _record(s, "seen", rec.version, actor, now=store.clock(), against=cur.version, seen_upto=int(upto),
                note=f"looked at the disagreements up to #{upto} ({n} in all)")
        return n

    return store.transaction(write)


# --- the gate, promotion, rollback -------------------------------------------------------------------------------
def loader(settings, router=None):
    """record -> predictor: the one this process already serves if it has it (same sha256), else a pinned load
    (memoised: the gate asks twice per version)."""
    cache: dict[str, object] = {}

    def load(record: VersionRecord):
        if record.sha256 not in cache:
            routes = router.routes() if router is not None else None
            live = [p for p in (routes.current, routes.candidate) if p is not None] if routes else []
            match = [p for p in live if p.info.sha256 == record.sha256]
            cache[record.sha256] = match[0] if match else versions.load_predictor(record, settings)
        return cache[record.sha256]

    return load


def check_gate(store, settings, version: str, load) -> promotion.GateResult:
    """What the gate says about promoting ``version`` now (read-only)."""
    cand, cur = store.transaction(lambda s: (_need(s, version), versions.current(s)), read=True)
    if cur is None:
        raise RolloutError("no version is current yet: there is nothing to compare the candidate with")
    if cand.version == cur.version:
        raise RolloutError(f"{cand.version} is already the current version")
    return promotion.evaluate(store, settings, cand, cur, load)


def promote(store, settings, version: str, *, actor: str, confirmed: bool, load, override: str | None = None,
            note: str = "") -> Promoted:
    """Make ``version`` current, through the gate, confirmed by a person. ``override``: the reason to promote
    although the gate refused (recorded with the gate's findings, logged as a warning)."""
    actor = _actor(actor)
    override = (override or "").strip() or None
    if not confirmed:
        raise RolloutError("a person must confirm the promotion (the tab's checkbox; the CLI asks, or --yes)")
    result = check_gate(store, settings, version, load)
    if not result.passed and override is None:
        raise GateRefused(result)
    overridden = override if not result.passed else None
    text = f"promoted by {actor}; gate {'passed' if result.passed else 'FAILED: ' + ', '.join(result.failed)}"
    if overridden:
        text += f"; OVERRIDE: {overridden}"

    def write(s):
        cur = versions.current(s)
        if cur is None or cur.version != result.current:
            raise RolloutError("the current version changed while the gate ran; check the gate again")
        now = store.clock()
        rec = versions.set_status(s, result.candidate, "current", now=now, note=f"{text}. {note}".strip())
        _record(s, "promote", rec.version, actor, now=now, against=cur.version, gate=result.to_dict(),
                override=overridden, note=note)
        return rec, versions.get(s, cur.version)

    rec, replaced = store.transaction(write, durable=True)
    if overridden:
        log.warning("PROMOTED OVER A FAILED GATE: %s by %s (failed: %s); reason: %s", rec.version, actor,
                    ", ".join(result.failed), overridden)
    else:
        log.info("promoted %s (replacing %s) by %s; the gate passed", rec.version, replaced.version, actor)
    return Promoted(rec, replaced, result, overridden)


def rollback(store, *, actor: str, note: str = "") -> Promoted:
    """The version that was current before this one is current again; this one is retired. No gate: it goes back
    to what served before."""
    actor = _actor(actor)

    def write(s):
        cur, target = versions.current(s), versions.previous_current(s)
        if target is None:
            raise RolloutError("there is no earlier current version to roll back to")
        now = store.clock()
        rec = versions.set_status(s, target.version, "current", now=now,
                                  note=f"rollback by {actor} (from {cur.version if cur else 'none'}). {note}".strip())
        _record(s, "rollback", rec.version, actor, now=now, against=cur.version if cur else None, note=note)
        return Promoted(rec, versions.get(s, cur.version) if cur else None, None, None)

    done = store.transaction(write, durable=True)
    log.warning("rolled back to %s (from %s) by %s", done.record.version,
                done.replaced.version if done.replaced else "none", actor)
    return done


def history(store, *, limit: int = 50) -> list[dict]:
    """The latest rollout actions, newest first."""
    def read(s):
        rows = s.scalars(select(RolloutAction).order_by(RolloutAction.id.desc()).limit(limit))
        return [{"id": r.id, "time": r.created, "action": r.action, "version": r.version, "by": r.actor,
                 "share": r.canary_share, "against": r.against, "override": r.override,
                 "gate_passed": (r.gate or {}).get("passed"), "note": r.note} for r in rows]

    return store.transaction(read, read=True)
