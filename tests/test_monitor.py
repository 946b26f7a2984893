"""The background monitor end to end (pipeline -> log -> drift check -> /healthz, log lines, gauges), the new
saturation column, accuracy from the audit sample (Wilson by hand), agreement, confusion, the feedback-loop check,
the Monitor tab's handlers and what a refresh costs at 100k predictions."""

from __future__ import annotations

import io
import logging
import time
from datetime import timedelta
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageEnhance
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from bench import drift_streams
from review.accuracy import wilson
from review.db import Prediction
from review.monitor import Monitor
from review.period import collect
from serving.metrics import Metrics
from serving.pipeline import Input
from serving.router import ModelRouter
from settings import Settings
from tests import review_fixtures as rf
from tests.app_support import app_parts, server_for
from tests.review_fixtures import MODEL, FakeClock, FakePredictor, probs, upload
from ui.monitor_tab import MonitorHandlers

services, sqlite_url, db_url = rf.services, rf.sqlite_url, rf.db_url  # fixtures


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# --- pure -------------------------------------------------------------------------------------------------------
def test_wilson_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.716752; half 1.96 / 1.38416 * sqrt(0.016 + 0.009604)
    lo, hi = wilson(8, 10, z=1.96)
    centre = (0.8 + 1.96**2 / 20) / (1 + 1.96**2 / 10)
    half = 1.96 / (1 + 1.96**2 / 10) * (0.8 * 0.2 / 10 + 1.96**2 / 400) ** 0.5
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)  # not the useless 1.0-1.0
    assert wilson(0, 5) == pytest.approx((0.0, 0.4345), abs=1e-4)
    assert all(np.isnan(wilson(0, 0)))
    with pytest.raises(ValueError):
        wilson(3, 2)


# --- the log measures saturation ---------------------------------------------------------------------------------
def test_the_writer_stores_saturation(services, sqlite_url):
    kit = services(sqlite_url)
    grey = Image.new("RGB", (40, 40), (90, 90, 90))
    red = Image.new("RGB", (40, 40), (200, 20, 20))
    for img in (grey, red):
        # what the request path passes: the size only; the writer measures brightness and saturation
        kit.log(data=png(img), stats={"width": 40, "height": 40}, probs=probs(1, 1, 1), source="upload",
                latency_ms=1.0)
    kit.store.flush()
    rows = kit.store.transaction(lambda s: s.execute(select(Prediction.brightness, Prediction.saturation)
                                                     .order_by(Prediction.saturation)).all(), read=True)
    assert rows[0].saturation == 0.0 and rows[0].brightness == pytest.approx(90 / 255)
    assert rows[1].saturation == pytest.approx(180 / 255)


# --- accuracy, agreement, confusion, corrections -----------------------------------------------------------------
def _decide_all(kit, plan):
    """plan: [(action, label)] in queue order."""
    for action, label in plan:
        item = kit.desk.next_item("alice")
        assert kit.desk.decide("alice", item.item_id, action=action, label=label,
                               idempotency_key=f"{item.item_id}-{action}").ok


def test_audit_accuracy_agreement_and_confusion(services, db_url, tmp_path):
    kit = services(db_url, audit_rate=1.0, low_confidence=0.0, low_margin=0.0)
    # six audited predictions: red x3, green x2, blue x1 (most probable first in queue order is not needed)
    for i, p in enumerate([(0.9, 0.05, 0.05)] * 3 + [(0.05, 0.9, 0.05)] * 2 + [(0.05, 0.05, 0.9)]):
        kit.log(**upload(rf.square((10 * i, 80, 80), mark=i + 1)), probs=probs(*p), source="upload", latency_ms=2.0)
    kit.store.flush()
    _decide_all(kit, [("confirm", None)] * 2 + [("relabel", "blue")] + [("confirm", None)]
                + [("relabel", "red")] + [("out_of_domain", None)])
    from review.accuracy import audit_accuracy, reviewed_confusion

    acc = kit.store.transaction(audit_accuracy, read=True)[MODEL.version]
    assert (acc["reviewed"], acc["correct"], acc["excluded"]) == (5, 3, 1)
    assert (acc["low"], acc["high"]) == pytest.approx(wilson(3, 5))
    conf = kit.store.transaction(lambda s: reviewed_confusion(s, MODEL.version, MODEL.vocab), read=True)
    # rows: reviewers' label, columns: prediction (red, green, blue)
    assert conf["matrix"] == [[2, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert conf["per_class"]["red"] == {"reviewed": 3, "agreed": 2, "agreement": pytest.approx(2 / 3)}
    assert conf["per_class"]["green"]["agreement"] == 0.5
    assert "blue" not in conf["per_class"]  # its only item was marked out of domain


def test_corrections_over_time(services, sqlite_url):
    clock = FakeClock()
    kit = services(sqlite_url, clock=clock, audit_rate=1.0, low_confidence=0.0, low_margin=0.0)
    ids = []
    for day in range(2):
        for i in range(4):
            ids.append(kit.log(**upload(rf.square((day * 50 + i, 9, 9), mark=i + 1)), probs=probs(0.8, 0.1, 0.1),
                               source="upload", latency_ms=1.0))
        clock.advance(days=1)
    kit.log(**upload(rf.square((1, 2, 3))), probs=probs(0.8, 0.1, 0.1), source="dataset", latency_ms=1.0,
            claimed_label="blue")  # not traffic: never counted
    kit.store.flush()
    kit.store.record_feedback(ids[0], correct=False, claimed_label="green")  # day 0: a user corrects one
    kit.store.record_feedback(ids[1], correct=True, claimed_label=None)  # a user agrees: not a correction
    kit.store.flush()
    # day 1: reviewers relabel one audited image (its queue item), confirm another
    day1 = set(ids[4:6])
    for _ in range(20):
        item = kit.desk.next_item("alice")
        if item is None:
            break
        action = ("relabel", "blue") if item.prediction_id == ids[4] else ("confirm", None) \
            if item.prediction_id == ids[5] else ("skip", None)
        kit.desk.decide("alice", item.item_id, action=action[0], label=action[1], idempotency_key=f"k{item.item_id}")
        day1.discard(item.prediction_id)
    assert not day1
    from review.accuracy import corrections_by_bucket
    from review.period import bucket_expr

    rows = kit.store.transaction(lambda s: corrections_by_bucket(s, bucket_expr("sqlite", "day"),
                                                                 drift_streams_traffic(), None, None), read=True)
    assert rows == [("2026-01-01", 4, 1), ("2026-01-02", 4, 1)]


def drift_streams_traffic():
    from review.monitor import TRAFFIC

    return TRAFFIC


# --- the monitor end to end on the demo model -------------------------------------------------------------------
def feed(parts, images, source="upload"):
    for i in range(0, len(images), 8):
        parts.pipeline.predict([Input(png(im), source) for im in images[i:i + 8]])
    parts.store.flush()


def test_monitor_alarms_once_reports_and_clears(tmp_path, demo_predictor, caplog):
    settings = Settings(data_dir=tmp_path / "data", drift_window=250, drift_min_window=200, audit_rate=0.0)
    parts = app_parts(settings, demo_predictor)
    try:
        pool = drift_streams.digit_pool()
        normal = drift_streams.stream("unshifted", pool, 250, seed=5)
        assert parts.monitor.status().status == "starting"
        caplog.set_level(logging.INFO, logger="review.monitor")
        feed(parts, normal[:150])
        assert parts.monitor.refresh().status == "insufficient_data"
        feed(parts, normal[150:])
        calm = parts.monitor.refresh()
        assert calm.status == "ok", calm.as_dict()
        feed(parts, [ImageEnhance.Brightness(im).enhance(0.4) for im in normal])  # night falls
        dark = parts.monitor.refresh()
        parts.monitor.refresh()  # still drifting: no second line
        assert dark.status == "drifting" and "brightness" in dark.versions[0].alarms, dark.as_dict()
        raised = [r for r in caplog.records if "drift alarm" in r.getMessage()]
        assert len(raised) == len(dark.versions[0].alarms), [r.getMessage() for r in raised]
        assert any("brightness PSI" in r.getMessage() for r in raised)

        client = TestClient(server_for(settings, parts))
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["model"] == demo_predictor.info.version  # unchanged fields
        model = health["drift"]["models"][demo_predictor.info.version]
        assert health["drift"]["status"] == "drifting" and "brightness" in model["alarms"]
        assert model["checks"]["brightness"]["psi"] > 0.25 and model["window"] == 250
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        alarms = {s.labels["check"]: s.value for s in families["loupe_drift_alarm"].samples}
        assert alarms["brightness"] == 1.0 and alarms["aspect"] == 0.0
        assert {s.labels["reason"] for s in families["loupe_review_queue_open"].samples} >= {"audit", "high_loss"}

        feed(parts, drift_streams.stream("unshifted", pool, 250, seed=6))  # day breaks
        assert parts.monitor.refresh().status == "ok"
        cleared = [r for r in caplog.records if "drift cleared" in r.getMessage()]
        assert len(cleared) == len(raised)
        saturation = parts.store.transaction(lambda s: s.scalars(select(Prediction.saturation)).all(), read=True)
        assert len(saturation) == 750 and max(saturation) < 0.04  # the writer measured every upload: greyscale
    finally:
        parts.store.close()


def test_the_monitor_thread_keeps_going_after_a_failure(tmp_path, demo_predictor, caplog):
    settings = Settings(data_dir=tmp_path / "data", monitor_every_s=0.05)
    parts = app_parts(settings, demo_predictor)
    calls = []
    real = parts.monitor.refresh

    def flaky():
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("database went away")
        return real()

    parts.monitor.refresh = flaky
    caplog.set_level(logging.INFO, logger="review.monitor")
    try:
        parts.monitor.start()
        deadline = time.monotonic() + 20
        while parts.monitor.status().checked is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert parts.monitor.status().checked is not None
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "database went away" in errors[0].getMessage()  # said once, not three times
    finally:
        parts.monitor.stop()
        parts.store.close()


# --- the Monitor tab ---------------------------------------------------------------------------------------------
def tab_for(kit) -> MonitorHandlers:
    router = ModelRouter(FakePredictor(MODEL, lambda images: np.full((len(images), 3), 1 / 3)))
    return MonitorHandlers(kit.store.settings, Monitor(kit.store.settings, kit.store, router, Metrics()))


def test_the_tab_is_for_reviewers_only(services, sqlite_url):
    from review.auth import hash_password

    kit = services(sqlite_url, reviewers=f"alice:{hash_password('x', iterations=1000)}")
    h = tab_for(kit)
    for who in (None, SimpleNamespace(username=None), SimpleNamespace(username="mallory")):
        with pytest.raises(gr.Error):
            h.show("Last 7 days", who)
        with pytest.raises(gr.Error):
            h.live_banner(who)
    alice = SimpleNamespace(username="alice")
    with pytest.raises(gr.Error, match="Unknown period"):
        h.show("forever", alice)


def test_the_tab_draws_every_plot(services, db_url):
    from review.auth import hash_password

    kit = services(db_url, reviewers=f"alice:{hash_password('x', iterations=1000)}", audit_rate=1.0)
    for i in range(12):
        kit.log(**upload(rf.square((20 * i, 30, 30), mark=i + 1)), probs=probs(0.7, 0.2, 0.1), source="api",
                latency_ms=3.0 + i)
    kit.store.flush()
    item = kit.desk.next_item("alice")
    kit.desk.decide("alice", item.item_id, action="relabel", label="blue", idempotency_key="k")
    h = tab_for(kit)
    h.monitor.refresh()
    alice = SimpleNamespace(username="alice")
    html = h.show("Last 24 hours", alice)
    for plot in ("plot-traffic", "plot-confidence", "plot-latency", "plot-accuracy", "plot-confusion",
                 "plot-corrections", "plot-storage"):
        assert f'id="{plot}"' in html, plot
    assert 'src="data:image/png;base64,' in html and "http" not in html
    assert "no reference data for this model: run python -m model.calibrate" in html  # says so, no plots
    assert "1 of 12 answers" in html  # the relabelled one
    assert "drift-banner" in h.live_banner(alice)


@pytest.mark.slow
def test_a_refresh_at_100k_predictions(tmp_path):
    """The cost a reviewer pays (and what the report pays) at 100k predictions in the period, on SQLite."""
    from bench.synthetic import populate
    from review.db import make_engine

    settings = rf.make_settings(tmp_path, f"sqlite:///{tmp_path / 'loupe.db'}", monitor_max_rows=100_000)
    engine = make_engine(settings.db_url)
    populate(engine, 100_000, model_version="synthetic@000000000000")
    engine.dispose()
    kit = rf.build_kit(settings, None)
    try:
        h = tab_for(kit)
        now = kit.store.clock()
        start = time.perf_counter()
        data = kit.store.transaction(lambda s: collect(s, settings, version="synthetic@000000000000",
                                                       since=now - timedelta(days=2), until=now,
                                                       references=h.monitor.references), read=True)
        queries = time.perf_counter() - start
        from review.report import sections

        sections(data, None)
        total = time.perf_counter() - start
        print(f"\n100k predictions: queries {queries:.2f} s, queries + plots {total:.2f} s")
        assert data.total == 100_000 and len(data.window) == 100_000 and data.capped
        assert sum(n for _, n, _ in data.corrections) == 100_000
    finally:
        kit.store.close()
