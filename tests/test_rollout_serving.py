"""Serving during a rollout: shadow scoring (logged with its role, never shown, off the request path, drops
counted), canary routing (share, stickiness, REST sessions), and the registry follower (serves what the registry
says, loads before it swaps, keeps serving when a load fails, rollback without a load)."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from model import rollout, versions
from model.demo import DEMO_EXAMPLES_DIR
from model.loading import ModelLoadError
from model.predictor import ModelInfo
from review.db import Prediction, ShadowPrediction
from serving.follower import RegistryFollower, adopt, register_settings_model, startup_predictor
from serving.pipeline import Answer, Input, Pipeline
from serving.router import ModelRouter, Routes
from serving.shadow import ShadowScorer
from tests import review_fixtures as rf
from tests.rollout_support import VOCAB, ColourModel, colour_image, decode, make_world, png_bytes

services, sqlite_url, db_url = rf.services, rf.sqlite_url, rf.db_url  # fixtures


def colour_models():
    return (ColourModel(ModelInfo("colours", "c" * 64, VOCAB, "onnx")),
            ColourModel(ModelInfo("colours", "d" * 64, VOCAB, "onnx"), wrong={0, 1, 2}))


class Blocking(ColourModel):
    """A shadow model that holds its first call until released."""

    def __init__(self, info):
        super().__init__(info)
        self.entered, self.release = threading.Event(), threading.Event()

    def predict_probs(self, images):
        self.entered.set()
        assert self.release.wait(30)
        return super().predict_probs(images)


def shadow_pipeline(kit, cur, cand, maxsize=8):
    for m in (cur, cand):
        kit.store.register_model(m.info)
    router = ModelRouter(cur)
    router.set_candidate(cand, "shadow")
    scorer = ShadowScorer(kit.store, decode=decode, maxsize=maxsize)
    return Pipeline.from_settings(kit.store.settings, router, kit.store, shadow=scorer), scorer


def request(i: int, source="upload", session=None) -> Input:
    return Input(png_bytes(colour_image(i % 3, i)), source, session)


# --- shadow ------------------------------------------------------------------------------------------------------
def test_shadow_answers_are_logged_with_their_role_and_never_shown(services, db_url):
    kit = services(db_url)
    cur, cand = colour_models()
    pipeline, scorer = shadow_pipeline(kit, cur, cand)
    try:
        answers = pipeline.predict([request(i) for i in range(6)])
        scorer.flush()
    finally:
        scorer.close()
    kit.store.flush()
    # what the user got: the current model's answer, its version, its probabilities
    assert all(isinstance(a, Answer) and a.model == cur.info for a in answers)
    assert [a.label for a in answers] == [VOCAB[i % 3] for i in range(6)]
    rows = kit.store.transaction(lambda s: s.scalars(select(ShadowPrediction).order_by(ShadowPrediction.id)).all(),
                                 read=True)
    assert [r.prediction_id for r in rows] == [a.prediction_id for a in answers]
    assert {(r.role, r.model_version, r.served_version) for r in rows} == {("shadow", cand.info.version,
                                                                           cur.info.version)}
    assert [r.agrees for r in rows] == [False, False, False, True, True, True]  # the candidate errs on 0, 1, 2
    assert [r.predicted for r in rows[:3]] == ["green", "blue", "red"]
    # the prediction log holds the served answers only: nothing was logged under the shadow's version
    logged = kit.store.transaction(lambda s: s.scalars(select(Prediction.model_version)).all(), read=True)
    assert logged == [cur.info.version] * 6
    assert scorer.stats() == {"submitted": 6, "scored": 6, "dropped": 0, "failed": 0, "waiting": 0}


def test_shadow_runs_off_the_request_path_and_drops_what_does_not_fit(services, sqlite_url):
    kit = services(sqlite_url)
    cur = ColourModel(ModelInfo("colours", "c" * 64, VOCAB, "onnx"))
    cand = Blocking(ModelInfo("colours", "d" * 64, VOCAB, "onnx"))
    pipeline, scorer = shadow_pipeline(kit, cur, cand, maxsize=2)
    try:
        first = pipeline.predict_one(request(0))
        assert cand.entered.wait(10)  # the shadow is busy with the first request...
        # ...and every further answer comes back while it is still blocked: nothing waits for the shadow
        later = [pipeline.predict_one(request(i)) for i in range(1, 6)]
        assert not cand.release.is_set()
        assert all(isinstance(a, Answer) and a.model == cur.info for a in [first, *later])
        stats = scorer.stats()
        assert stats["submitted"] == 6 and stats["dropped"] == 3 and stats["waiting"] == 2
        cand.release.set()
        scorer.flush()
    finally:
        cand.release.set()
        scorer.close()
    assert scorer.stats()["scored"] == 3
    n = kit.store.transaction(lambda s: len(s.scalars(select(ShadowPrediction)).all()), read=True)
    assert n == 3


def test_only_live_logged_requests_are_shadowed(services, sqlite_url):
    kit = services(sqlite_url)
    cur, cand = colour_models()
    pipeline, scorer = shadow_pipeline(kit, cur, cand)
    try:
        pipeline.predict([request(0, "dataset"), request(1, "stream"), Input(png_bytes(colour_image(2, 2)), "stream",
                                                                              log=False)])
        scorer.flush()
    finally:
        scorer.close()
    assert scorer.stats()["scored"] == 1  # the logged live frame; not the dataset audit, not the unlogged frame


# --- canary ------------------------------------------------------------------------------------------------------
def test_canary_share_and_stickiness():
    cur, cand = colour_models()
    routes = Routes(cur, cand, "canary", 0.3)
    sessions = [f"session-{i}" for i in range(4000)]
    on_canary = {s for s in sessions if routes.answering(s) is cand}
    assert 0.27 < len(on_canary) / len(sessions) < 0.33
    assert all((routes.answering(s) is cand) == (s in on_canary) for s in sessions)  # sticky
    assert routes.answering(None) is cur and routes.answering("") is cur  # no session: never flips
    wider = Routes(cur, cand, "canary", 0.5)
    assert on_canary <= {s for s in sessions if wider.answering(s) is cand}  # a larger share only adds sessions
    assert all(Routes(cur, cand, "shadow").answering(s) is cur for s in sessions[:50])


def test_canary_answers_show_and_log_the_version_that_answered(services, sqlite_url):
    kit = services(sqlite_url)
    cur, cand = colour_models()
    for m in (cur, cand):
        kit.store.register_model(m.info)
    router = ModelRouter(cur)
    router.set_candidate(cand, "canary", 0.5)
    pipeline = Pipeline.from_settings(kit.store.settings, router, kit.store)
    answers = pipeline.predict([request(5, session=f"s{i}") for i in range(40)])
    kit.store.flush()
    seen = {a.model.version for a in answers}
    assert seen == {cur.info.version, cand.info.version}
    logged = kit.store.transaction(lambda s: dict(s.execute(select(Prediction.id, Prediction.model_version)).all()),
                                   read=True)
    assert all(logged[a.prediction_id] == a.model.version for a in answers)
    again = pipeline.predict([request(5, session=f"s{i}") for i in range(40)])
    assert [a.model.version for a in again] == [a.model.version for a in answers]


def test_rest_clients_stick_to_a_version_with_a_session_header(tmp_path, demo_predictor):
    from tests.app_support import app_parts, server_for
    from tests.review_fixtures import FakePredictor

    settings = rf.make_settings(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    parts = app_parts(settings, demo_predictor)
    shifted = ModelInfo("digits-canary", "e" * 64, demo_predictor.info.vocab, "onnx")
    canary = FakePredictor(shifted, lambda imgs: np.roll(demo_predictor.predict_probs(imgs), 1, axis=1))
    parts.store.register_model(shifted)
    parts.router.set_candidate(canary, "canary", 0.5)
    image = sorted(DEMO_EXAMPLES_DIR.glob("*.png"))[0].read_bytes()
    try:
        with TestClient(server_for(settings, parts)) as client:
            def version(session):
                headers = {"X-Loupe-Session": session} if session else {}
                r = client.post("/api/v1/predict", files={"file": ("d.png", image, "image/png")}, headers=headers)
                assert r.status_code == 200, r.text
                return r.json()["model"]["version"]

            by_session = {f"client-{i}": version(f"client-{i}") for i in range(12)}
            assert set(by_session.values()) == {demo_predictor.info.version, shifted.version}
            assert all(version(s) == v for s, v in list(by_session.items())[:6])  # sticky
            assert {version(None) for _ in range(3)} == {demo_predictor.info.version}
    finally:
        parts.shadow.close()
        parts.store.close()


# --- the registry follower ---------------------------------------------------------------------------------------
def test_follower_serves_what_the_registry_says(services, db_url):
    kit = services(db_url)
    w = make_world(kit)
    loads = []

    def load(rec):
        loads.append(rec.version)
        return w.load(rec)

    stale = ColourModel(ModelInfo("colours", "f" * 64, VOCAB, "onnx"))  # what this replica served before
    router = ModelRouter(stale)
    follower = RegistryFollower(kit.store, router, kit.store.settings, load=load)
    assert router.refresh().versions() == {"current": w.current.version}
    rollout.start_shadow(kit.store, w.candidate.version, actor="alice")
    assert follower.sync().versions() == {"current": w.current.version, "shadow": w.candidate.version}
    rollout.start_canary(kit.store, w.candidate.version, share=0.2, actor="alice")
    routes = follower.sync()
    assert routes.role == "canary" and routes.canary_share == 0.2 and routes.candidate is w.cand
    assert loads == [w.current.version, w.candidate.version]  # each loaded once, before it served
    kit.store.transaction(lambda s: versions.set_status(s, w.candidate.version, "current", now=kit.store.clock()))
    assert follower.sync().versions() == {"current": w.candidate.version}
    rollout.rollback(kit.store, actor="bob")
    assert follower.sync().versions() == {"current": w.current.version}
    assert len(loads) == 2  # promotion and rollback swapped models already loaded
    assert kit.store.vocab(w.candidate.version) == VOCAB  # registered for logging canary answers


def test_follower_loads_before_it_swaps(services, sqlite_url):
    kit = services(sqlite_url)
    w = make_world(kit)
    router = ModelRouter(w.cur)
    entered, release = threading.Event(), threading.Event()

    def slow_load(rec):
        entered.set()
        assert release.wait(30)
        return w.load(rec)

    follower = RegistryFollower(kit.store, router, kit.store.settings, load=slow_load)
    rollout.start_shadow(kit.store, w.candidate.version, actor="alice")
    syncing = threading.Thread(target=follower.sync)
    syncing.start()
    try:
        assert entered.wait(10)
        # while the candidate loads, requests are answered by the routes as they were
        assert router.routes() == Routes(w.cur)
    finally:
        release.set()
        syncing.join(30)
    assert router.routes().shadow() is w.cand


def test_follower_keeps_serving_when_a_version_cannot_be_loaded(services, sqlite_url, caplog):
    kit = services(sqlite_url)
    w = make_world(kit)

    def broken(rec):
        if rec.version == w.candidate.version:
            raise ModelLoadError("Refusing to load /x/export.pkl: its sha256 is 00, but ... pins dd")
        return w.load(rec)

    router = ModelRouter(w.cur)
    follower = RegistryFollower(kit.store, router, kit.store.settings, load=broken)
    rollout.start_canary(kit.store, w.candidate.version, share=0.5, actor="alice")
    assert follower.sync() == Routes(w.cur)
    assert "cannot load the canary" in follower.status()["error"] and "Refusing to load" in caplog.text
    kit.store.transaction(lambda s: versions.set_status(s, w.candidate.version, "current", now=kit.store.clock()))
    assert follower.sync().current is w.cur  # a current that cannot be loaded: keep serving the one we have
    assert "cannot serve the current version" in follower.status()["error"]


def test_start_up_serves_the_registry_current_else_adopts_the_settings_model(tmp_path, exported, demo_predictor,
                                                                              demo_settings):
    path, sha = exported("pad224")
    settings = rf.make_settings(tmp_path, f"sqlite:///{tmp_path / 'l.db'}", models_dir=tmp_path / "shared")
    shutil.copytree(demo_settings.cache_dir, settings.cache_dir)  # the demo's converted bundle: no 10 s conversion
    kit = rf.build_kit(settings, model=None)
    try:
        assert startup_predictor(settings, kit.store).info.sha256 == demo_predictor.info.sha256  # nothing current
        adopt(kit.store, settings, demo_predictor)
        assert kit.store.transaction(versions.current, read=True).sha256 == demo_predictor.info.sha256
        # a registered version lives in the shared model store under its sha256, whatever path was recorded
        (tmp_path / "shared" / sha).mkdir(parents=True)
        (tmp_path / "shared" / sha / "export.pkl").write_bytes(path.read_bytes())
        kit.store.transaction(lambda s: versions.set_status(s, versions.register(
            s, name="pads", sha256=sha, path="models/elsewhere/export.pkl", vocab=("blue", "green", "red"),
            now=kit.store.clock()).version, "current", now=kit.store.clock()))
        assert startup_predictor(settings, kit.store).info.sha256 == sha
        (tmp_path / "shared" / sha / "export.pkl").unlink()
        with pytest.raises(ModelLoadError, match="LOUPE_MODELS_DIR.*rollback"):
            startup_predictor(settings, kit.store)
        adopt(kit.store, settings, demo_predictor)  # the registry serves another version: the demo stays retired
        assert kit.store.transaction(versions.current, read=True).sha256 == sha
    finally:
        kit.store.close()


def test_a_changed_settings_model_becomes_a_candidate(tmp_path, exported, demo_predictor, demo_settings, caplog):
    """LOUPE_MODEL_PATH names a model the registry does not serve: it is registered as a candidate (visible in the
    Models tab), neither served behind the registry's back nor silently ignored."""
    path, sha = exported("pad224")
    settings = rf.make_settings(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")  # the settings serve the demo
    shutil.copytree(demo_settings.cache_dir, settings.cache_dir)
    kit = rf.build_kit(settings, model=None)
    try:
        kit.store.transaction(lambda s: versions.set_status(s, versions.register(
            s, name="pads", sha256=sha, path=path, vocab=("blue", "green", "red"), now=kit.store.clock()).version,
            "current", now=kit.store.clock()))
        register_settings_model(settings, kit.store)
        demo = kit.store.transaction(lambda s: versions.by_sha256(s, demo_predictor.info.sha256), read=True)
        assert demo.status == "candidate" and "roll it out" in caplog.text
        assert kit.store.transaction(versions.current, read=True).sha256 == sha
    finally:
        kit.store.close()
