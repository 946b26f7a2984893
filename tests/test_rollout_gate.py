"""The promotion gate (model.promotion) and the rollout use cases (model.rollout): a worse candidate is refused on
each criterion, an equal or better one passes, a person confirms and is recorded, an override is recorded and loud,
rollback is one call; and the same through ``python -m model.versions``."""

from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import select

from model import promotion, rollout, versions, versions_cli
from review.db import ModelVersionEvent, RolloutAction, ShadowPrediction
from tests import review_fixtures as rf
from tests.rollout_support import make_world

services, sqlite_url, db_url = rf.services, rf.sqlite_url, rf.db_url  # fixtures

AUDIT = range(0, 40)  # reviewed, in the random audit sample
OTHER = range(100, 124)  # reviewed, queued for other reasons (low confidence)
HELDOUT = range(200, 240)  # the candidate's held-out split
SHADOW = range(300, 320)  # live traffic scored in shadow


def world_for(services, url, **kw):
    kit = services(url, gate_margin=0.15, gate_min_shadowed=10, low_confidence=0.6)
    return make_world(kit, **kw)


def checks(result) -> dict[str, bool]:
    return {c.name: c.passed for c in result.checks}


def full_evidence(w) -> None:
    w.review(AUDIT, audit=True)
    w.review(OTHER, audit=False)
    w.shadow_traffic(SHADOW)


def read(w, fn):
    return w.store.transaction(fn, read=True)


# --- statistics ----------------------------------------------------------------------------------------------------
def test_wilson_and_tango_intervals():
    lo, hi = promotion.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # no discordant pairs: the difference can still be as low as the Wilson bound of the discordance rate
    lo, hi = promotion.tango_interval(0, 0, 60)
    z2 = promotion.Z95 ** 2
    assert lo == pytest.approx(-z2 / (60 + z2), abs=1e-6) and hi == pytest.approx(z2 / (60 + z2), abs=1e-6)
    lo, hi = promotion.tango_interval(8, 2, 100)
    assert lo < 0.06 < hi and (lo, hi) == pytest.approx(tuple(-x for x in promotion.tango_interval(2, 8, 100)[::-1]))
    # more items with the same rates: a narrower interval
    lo2, hi2 = promotion.tango_interval(80, 20, 1000)
    assert hi2 - lo2 < hi - lo


# --- the gate ------------------------------------------------------------------------------------------------------
def test_equal_candidate_passes(services, db_url):
    w = world_for(services, db_url, heldout=HELDOUT)
    full_evidence(w)
    result = w.gate()
    assert result.passed, result.text()
    audit = next(c for c in result.checks if c.name == "audit")
    assert audit.numbers["n"] == len(AUDIT) and audit.numbers["difference"] == 0
    heldout = next(c for c in result.checks if c.name == "heldout")
    assert heldout.numbers["n"] == len(HELDOUT)
    assert next(c for c in result.checks if c.name == "shadow").numbers["shadowed"] == len(SHADOW)


def test_worse_on_the_audit_sample_is_refused(services, sqlite_url):
    w = world_for(services, sqlite_url, heldout=HELDOUT)
    full_evidence(w)
    w.cand.wrong = set(range(0, 12))  # 12 of the 40 audit items
    assert checks(w.gate()) == {"audit": False, "reviewed": True, "heldout": True, "shadow": True}


def test_no_audit_sample_is_refused(services, sqlite_url):
    w = world_for(services, sqlite_url, heldout=HELDOUT)
    w.review(OTHER, audit=False)
    w.shadow_traffic(SHADOW)
    result = w.gate()
    assert checks(result)["audit"] is False and "no reviewed audit-sample items" in result.checks[0].summary


def test_clearly_worse_on_other_reviewed_items_is_refused(services, sqlite_url):
    w = world_for(services, sqlite_url, heldout=HELDOUT)
    full_evidence(w)
    w.cand.wrong = {101, 102}  # a little worse on a biased sample: not refused on that alone
    assert checks(w.gate())["reviewed"] is True
    w.cand.wrong = set(range(100, 112))
    assert checks(w.gate()) == {"audit": True, "reviewed": False, "heldout": True, "shadow": True}


def test_worse_on_the_held_out_split_is_refused(services, sqlite_url):
    w = world_for(services, sqlite_url, heldout=HELDOUT)
    full_evidence(w)
    w.cand.wrong = set(range(200, 215))
    assert checks(w.gate()) == {"audit": True, "reviewed": True, "heldout": False, "shadow": True}


def test_held_out_falls_back_to_registry_error_rates(services, sqlite_url):
    """No held-out images on this machine: the registry's error rates decide."""
    w = world_for(services, sqlite_url)  # no held-out split recorded
    full_evidence(w)
    assert checks(w.gate())["heldout"] is True  # 8% against 10%
    w.store.transaction(lambda s: setattr(s.get(versions.ModelVersion, w.candidate.version), "metrics",
                                          {"error_rate": 0.12}))
    w.candidate = read(w, lambda s: versions.get(s, w.candidate.version))
    result = w.gate()
    assert checks(result)["heldout"] is False and "12.00%" in result.checks[2].summary


def test_items_the_candidate_was_trained_on_do_not_count(services, sqlite_url):
    trained = range(400, 420)
    w = world_for(services, sqlite_url, heldout=HELDOUT, trained=trained)
    full_evidence(w)
    w.review(trained, audit=True)
    w.cur.wrong = set(trained)  # the candidate "knows" its training images; the current model gets them wrong
    w.cand.wrong = set(range(0, 10))
    result = w.gate()
    audit = result.checks[0]
    assert audit.numbers["n"] == len(AUDIT) and audit.numbers["left_out"]["trained_on"] == len(trained)
    assert audit.passed is False  # counted, the 20 memorised images would have hidden the 10 new mistakes


def test_shadow_disagreements_need_a_person_and_enough_traffic(services, sqlite_url):
    w = world_for(services, sqlite_url, heldout=HELDOUT)
    w.review(AUDIT, audit=True)
    w.shadow_traffic(range(300, 305))
    result = w.gate()
    assert checks(result)["shadow"] is False and "at least 10 needed" in result.checks[3].summary
    w.cur.wrong = {306, 307, 308}  # the candidate is better there: they disagree on 3 live requests
    w.shadow_traffic(range(305, 320))
    result = w.gate()
    assert checks(result)["shadow"] is False and "3 not looked at" in result.checks[3].summary
    unseen = rollout.unseen_disagreements(w.store, w.candidate.version)
    assert [(d["served_label"], d["predicted"]) for d in unseen] == [("green", "red"), ("blue", "green"),
                                                                      ("red", "blue")]
    assert all(d["image_sha256"] for d in unseen)  # linked to the served prediction (and its stored image)
    assert rollout.mark_seen(w.store, w.candidate.version, upto=unseen[-1]["id"], actor="alice") == 3
    result = w.gate()
    assert result.passed, result.text()
    assert "looked at by alice" in result.checks[3].summary
    w.cur.wrong |= {321}
    w.shadow_traffic([321])  # a new disagreement after the person looked
    assert checks(w.gate())["shadow"] is False


# --- promote, override, rollback -----------------------------------------------------------------------------------
def test_promotion_needs_a_confirmation_and_records_the_person(services, db_url):
    w = world_for(services, db_url, heldout=HELDOUT)
    full_evidence(w)
    with pytest.raises(rollout.RolloutError, match="must confirm"):
        rollout.promote(w.store, w.settings, w.candidate.version, actor="alice", confirmed=False, load=w.load)
    with pytest.raises(rollout.RolloutError, match="say who you are"):
        rollout.promote(w.store, w.settings, w.candidate.version, actor=" ", confirmed=True, load=w.load)
    assert read(w, versions.current).version == w.current.version
    done = rollout.promote(w.store, w.settings, w.candidate.version, actor="alice", confirmed=True, load=w.load)
    assert done.record.status == "current" and done.replaced.status == "retired" and done.override is None
    event = read(w, lambda s: versions.history(s, w.candidate.version))[-1]
    assert (event.from_status, event.to_status) == ("candidate", "current")
    assert event.note.startswith("promoted by alice; gate passed") and event.created is not None
    action = read(w, lambda s: s.scalars(select(RolloutAction).where(RolloutAction.action == "promote")).one())
    assert (action.actor, action.against, action.override) == ("alice", w.current.version, None)
    assert action.gate["passed"] is True and {c["name"] for c in action.gate["checks"]} == {
        "audit", "reviewed", "heldout", "shadow"}


def test_a_refused_gate_changes_nothing_unless_overridden_loudly(services, sqlite_url, caplog):
    w = world_for(services, sqlite_url, heldout=HELDOUT)
    full_evidence(w)
    w.cand.wrong = set(range(0, 20))
    with pytest.raises(rollout.GateRefused) as refused:
        rollout.promote(w.store, w.settings, w.candidate.version, actor="alice", confirmed=True, load=w.load)
    assert refused.value.result.failed == ["audit"]
    assert read(w, versions.current).version == w.current.version
    with caplog.at_level(logging.WARNING, logger="model.rollout"):
        done = rollout.promote(w.store, w.settings, w.candidate.version, actor="alice", confirmed=True,
                               load=w.load, override="hotfix for class red, checked by hand")
    assert done.override == "hotfix for class red, checked by hand"
    assert "PROMOTED OVER A FAILED GATE" in caplog.text and "alice" in caplog.text
    event = read(w, lambda s: versions.history(s, w.candidate.version))[-1]
    assert "gate FAILED: audit" in event.note and "OVERRIDE: hotfix" in event.note
    action = read(w, lambda s: s.scalars(select(RolloutAction).where(RolloutAction.action == "promote")).one())
    assert action.override.startswith("hotfix") and action.gate["passed"] is False


def test_rollback_is_one_call(services, db_url):
    w = world_for(services, db_url, heldout=HELDOUT)
    with pytest.raises(rollout.RolloutError, match="no earlier current"):
        rollout.rollback(w.store, actor="bob")
    full_evidence(w)
    rollout.promote(w.store, w.settings, w.candidate.version, actor="alice", confirmed=True, load=w.load)
    done = rollout.rollback(w.store, actor="bob", note="users complain")
    assert done.record.version == w.current.version and done.replaced.version == w.candidate.version
    assert read(w, versions.current).version == w.current.version
    assert read(w, lambda s: versions.get(s, w.candidate.version)).status == "retired"
    last = read(w, lambda s: s.scalars(select(ModelVersionEvent).order_by(ModelVersionEvent.id.desc())).first())
    assert "rollback by bob" in last.note
    assert rollout.history(w.store)[0]["action"] == "rollback" and rollout.history(w.store)[0]["by"] == "bob"


def test_shadow_canary_stop_and_their_records(services, sqlite_url):
    w = world_for(services, sqlite_url)
    rollout.start_shadow(w.store, w.candidate.version, actor="alice")
    assert read(w, versions.in_role).status == "shadow"
    rollout.start_canary(w.store, w.candidate.version, share=0.25, actor="bob")
    assert read(w, lambda s: rollout.canary_share(s, w.candidate.version, 0.1)) == 0.25
    with pytest.raises(rollout.RolloutError, match="canary share"):
        rollout.start_canary(w.store, w.candidate.version, share=1.5, actor="bob")
    with pytest.raises(versions.VersionError, match="current"):
        rollout.start_shadow(w.store, w.current.version, actor="alice")  # the current model cannot shadow itself
    assert rollout.stop(w.store, actor="carol").status == "candidate"
    assert rollout.stop(w.store, actor="carol") is None
    assert [(h["action"], h["by"]) for h in rollout.history(w.store)] == [
        ("stop", "carol"), ("canary", "bob"), ("shadow", "alice")]


# --- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_goes_through_the_same_gate(services, sqlite_url, monkeypatch, capsys):
    w = world_for(services, sqlite_url, heldout=HELDOUT)
    full_evidence(w)
    settings = w.settings
    for k, v in {"LOUPE_DATA_DIR": settings.data_dir, "LOUPE_DATABASE_URL": settings.db_url,
                 "LOUPE_GATE_MARGIN": 0.15, "LOUPE_GATE_MIN_SHADOWED": 10}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(rollout, "loader", lambda settings, router=None: w.load)
    cand = w.candidate.version

    assert versions_cli.main(["shadow", cand, "--by", "carol"]) == 0
    assert versions_cli.main(["canary", cand, "--share", "0.3", "--by", "carol"]) == 0
    assert read(w, lambda s: rollout.canary_share(s, cand, 0.1)) == 0.3
    w.cand.wrong = set(range(0, 20))
    capsys.readouterr()
    assert versions_cli.main(["gate", cand]) == 3
    assert "[FAIL] Random audit sample" in capsys.readouterr().out
    assert versions_cli.main(["promote", cand, "--yes", "--by", "carol"]) == 3  # refused: nothing changed
    assert read(w, versions.current).version == w.current.version
    w.cand.wrong = set()
    assert versions_cli.main(["promote", cand, "--by", "carol"]) == 2  # no terminal to confirm on, and no --yes
    assert "--yes" in capsys.readouterr().err
    assert versions_cli.main(["promote", cand, "--yes", "--by", "carol"]) == 0
    assert read(w, versions.current).version == cand
    assert versions_cli.main(["rollback", "--by", "dave"]) == 0
    assert read(w, versions.current).version == w.current.version
    capsys.readouterr()
    assert versions_cli.main(["history"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["action"], r["by"]) for r in rows[:2]] == [("rollback", "dave"), ("promote", "carol")]
    assert versions_cli.main(["promote", "nope", "--yes"]) == 2
    assert "unknown model version 'nope'" in capsys.readouterr().err


def test_disagreements_count_only_beside_the_current_they_were_shadowed_with(services, sqlite_url):
    w = world_for(services, sqlite_url)
    w.cur.wrong = {300}
    answers = w.shadow_traffic(SHADOW)
    rows = read(w, lambda s: s.scalars(select(ShadowPrediction).order_by(ShadowPrediction.id)).all())
    assert [r.prediction_id for r in rows] == [a.prediction_id for a in answers]
    assert {(r.role, r.model_version, r.served_version) for r in rows} == {
        ("shadow", w.candidate.version, w.current.version)}
    assert [(r.served_label, r.predicted) for r in rows if not r.agrees] == [("green", "red")] and len(rows[0].probs) == 3
    evidence = read(w, lambda s: promotion.shadow_evidence(s, w.candidate.version, w.current.version))
    assert (evidence["shadowed"], evidence["disagreements"], evidence["unseen"]) == (len(SHADOW), 1, 1)
    other = read(w, lambda s: promotion.shadow_evidence(s, w.candidate.version, "colours@000000000000"))
    assert other["shadowed"] == 0


def test_cli_mistakes_are_messages_not_tracebacks(services, sqlite_url):
    """``python -m model.versions`` for real: a rollout mistake is one line and exit code 2."""
    import os
    import subprocess
    import sys

    w = world_for(services, sqlite_url)
    env = {**os.environ, "LOUPE_DATA_DIR": str(w.settings.data_dir), "LOUPE_DATABASE_URL": w.settings.db_url}
    for args, message in ((["rollback", "--by", "bob"], "no earlier current version"),
                          (["gate", w.current.version], "already the current version")):
        run = subprocess.run([sys.executable, "-m", "model.versions", *args], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 2 and "error: " in run.stderr and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
