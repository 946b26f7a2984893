"""The Models tab: its handlers called as plain Python (a fake gr.Request, as tests/test_ui_review.py does for the
Review tab), every one refusing anyone but a reviewer; and one real browser check that the tab renders for a
reviewer and is refused to an anonymous visitor."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from model import rollout, versions
from model.loading import ModelLoadError
from review.auth import hash_password
from review.db import RolloutAction
from serving.follower import RegistryFollower
from serving.pipeline import Pipeline
from serving.router import ModelRouter
from serving.shadow import ShadowScorer
from tests import review_fixtures as rf
from tests.browser_support import launch_args, start_app
from tests.rollout_support import decode, make_world
from ui.models_tab import ModelsHandlers

services, sqlite_url = rf.services, rf.sqlite_url  # fixtures
PASSWORD = "models please"


def req(username):
    return SimpleNamespace(username=username)


@pytest.fixture
def tab(services, sqlite_url):
    hashed = hash_password(PASSWORD, iterations=1000)
    kit = services(sqlite_url, reviewers=f"alice:{hashed}", gate_margin=0.15, gate_min_shadowed=5)
    w = make_world(kit)
    router = ModelRouter(w.cur)
    RegistryFollower(kit.store, router, kit.store.settings, load=w.load)
    scorer = ShadowScorer(kit.store, decode=decode)
    pipeline = Pipeline.from_settings(kit.store.settings, router, kit.store, shadow=scorer)
    yield SimpleNamespace(h=ModelsHandlers(kit.store.settings, kit.store, pipeline), w=w, router=router)
    scorer.close()


def actions(w) -> list[tuple[str, str]]:
    return w.store.transaction(lambda s: [(a.action, a.actor) for a in s.scalars(
        select(RolloutAction).order_by(RolloutAction.id))], read=True)


def test_every_handler_refuses_anyone_but_a_reviewer(tab):
    h, v = tab.h, tab.w.candidate.version
    calls = [lambda r: h.overview(r), lambda r: h.report(v, r), lambda r: h.compare(v, v, r), lambda r: h.gate(v, r),
             lambda r: h.disagreements(v, r), lambda r: h.seen(v, {"version": v, "upto": 1}, r), lambda r: h.start_shadow(v, r),
             lambda r: h.start_canary(v, 10, r), lambda r: h.stop(r), lambda r: h.promote(v, True, "x", r),
             lambda r: h.rollback(r)]
    for who in (None, "", "mallory", "hf:alice"):
        for call in calls:
            with pytest.raises(gr.Error, match="Log in as a reviewer"):
                call(req(who))
    assert actions(tab.w) == [] and tab.router.routes().candidate is None


def test_list_report_compare(tab):
    h, w = tab.h, tab.w
    w.store.transaction(lambda s: setattr(s.get(versions.ModelVersion, w.candidate.version), "note",
                                          "<script>alert(1)</script> retrained"))
    table, serving, choices, *_, history = h.overview(req("alice"))
    assert w.current.version in table and w.candidate.version in table and "<b>current</b>" in table
    assert "<script>" not in table and "&lt;script&gt;" in table
    assert f"Serving <code>{w.current.version}</code>" in serving
    assert [v for _, v in choices["choices"]] == [w.candidate.version, w.current.version]
    assert "No rollout actions yet" in history
    assert w.candidate.version in h.report(w.candidate.version, req("alice"))
    assert "<b>0.080</b>" in h.report(w.candidate.version, req("alice"))  # the registry's held-out error rate
    assert "b descends from a" in h.compare(w.current.version, w.candidate.version, req("alice"))
    with pytest.raises(gr.Error, match="Pick a version"):
        h.report(None, req("alice"))


def test_rollout_from_the_tab(tab):
    h, w, router = tab.h, tab.w, tab.router
    v = w.candidate.version
    assert "runs in shadow" in h.start_shadow(v, req("alice"))
    assert router.routes().shadow() is w.cand  # this replica followed at once
    w.cur.wrong = {300, 301}
    w.review(range(0, 40), audit=True)
    w.shadow_traffic(range(300, 310))
    with pytest.raises(gr.Error, match="Show this version's disagreements first"):
        h.seen(v, {}, req("alice"))
    html, shown = h.disagreements(v, req("alice"))
    assert html.count("<figure") == 2 and "data:image/png;base64," in html and "served <b>green</b>" in html
    gate = h.gate(v, req("alice"))
    assert "REFUSED" in gate and "2 not looked at" in gate
    with pytest.raises(gr.Error, match="Show this version's disagreements first"):
        h.seen(w.current.version, shown, req("alice"))  # what was shown belongs to another version
    assert "looked at" in h.seen(v, shown, req("alice"))
    assert "No disagreements left" in h.disagreements(v, req("alice"))[0]
    assert "PASSED" in h.gate(v, req("alice"))
    assert "30%" in h.start_canary(v, 30, req("alice"))
    assert router.routes().role == "canary" and router.routes().canary_share == 0.3
    with pytest.raises(gr.Error, match="Tick"):
        h.promote(v, False, "", req("alice"))
    status, gate = h.promote(v, True, "", req("alice"))
    assert status.startswith("Promoted") and "PASSED" in gate and router.current is w.cand
    assert "Rolled back by **alice**" in h.rollback(req("alice"))
    assert router.current is w.cur
    assert actions(w) == [("shadow", "alice"), ("seen", "alice"), ("canary", "alice"), ("promote", "alice"),
                          ("rollback", "alice")]
    *_, history = h.overview(req("alice"))
    assert "rollback" in history and "gate passed" in history


def test_a_refused_promotion_from_the_tab_changes_nothing_unless_overridden(tab, monkeypatch):
    h, w = tab.h, tab.w
    with pytest.raises(ModelLoadError, match="not on this machine.*LOUPE_MODELS_DIR"):
        versions.load_predictor(w.candidate, w.settings)  # the registered files of this test world do not exist
    monkeypatch.setattr(rollout, "loader", lambda settings, router=None: w.load)
    v = w.candidate.version
    status, gate = h.promote(v, True, "", req("alice"))
    assert status.startswith("**Refused by the gate**") and "REFUSED" in gate
    assert tab.router.current is w.cur and w.store.transaction(versions.current, read=True).version != v
    status, _ = h.promote(v, True, "urgent fix, checked by hand", req("alice"))
    assert "over a failed gate" in status and tab.router.current is w.cand
    overridden = w.store.transaction(lambda s: s.scalars(select(RolloutAction.override)).all(), read=True)
    assert overridden == ["urgent fix, checked by hand"]
    table, *_ = h.overview(req("alice"))
    assert "promoted over a failed gate" in table
    with pytest.raises(gr.Error, match="already the current"):
        h.gate(v, req("alice"))


# --- a real browser ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_models_tab_in_a_browser(tmp_path, playwright, demo_settings, demo_predictor):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")  # the demo's bundle: no conversion at start
    app = start_app(data, {"LOUPE_REVIEWERS": f"alice:{hash_password(PASSWORD, iterations=1000)}"})
    browser = playwright.chromium.launch(**launch_args())
    try:
        anonymous = browser.new_page()
        anonymous.goto(app.url + "/review/")
        expect(anonymous.get_by_label("password")).to_be_visible(timeout=30_000)
        assert anonymous.locator("#models-versions").count() == 0
        assert "digits-demo" not in anonymous.content()

        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app.url + "/review/")
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.get_by_role("tab", name="Models").click()
        expect(page.locator("#models-versions")).to_contain_text("digits-demo@", timeout=30_000)
        expect(page.locator("#models-versions")).to_contain_text("current")
        expect(page.locator("#models-serving")).to_contain_text("Serving digits-demo@")
        page.screenshot(path=str(tmp_path / "models-tab.png"), full_page=True)
    finally:
        browser.close()
        app.stop()
