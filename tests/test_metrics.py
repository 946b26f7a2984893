"""GET /metrics on a real server (uvicorn on a free port, the real build_server), parsed with prometheus-client's own
parser: request outcomes (ok, rejected, busy, error), latency and confidence histograms, model versions, queue sizes,
drift gauges, the log writer's counters; the bearer token; and nothing a reviewer-only page shows."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from model.demo import DEMO_EXAMPLES_DIR
from review.auth import hash_password
from serving.gate import Gate
from serving.metrics import GradioBusyCounter, Metrics
from serving.pipeline import Input
from settings import Settings
from tests import review_fixtures as rf
from tests.app_support import app_parts, serving

TOKEN = "scrape-me"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str | None = None, **labels) -> float:
    for s in fams[name].samples:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{sample or name} {labels}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_predictor):
    settings = Settings(data_dir=tmp_path_factory.mktemp("metrics") / "data", metrics_token=TOKEN, audit_rate=1.0,
                        reviewers=f"alice:{hash_password('pw', iterations=1000)}")
    parts = app_parts(settings, demo_predictor)
    gate = Gate(concurrency=1, max_waiting=0)
    with serving(settings, parts, gate=gate) as url:
        yield url, parts, gate
    parts.store.close()


def test_metrics_on_a_real_server(server):
    url, parts, gate = server
    digit = (DEMO_EXAMPLES_DIR / "digit_7.png").read_bytes()
    ok = httpx.post(url + "/api/v1/predict", files={"file": ("7.png", digit, "image/png")}, timeout=30)
    assert ok.status_code == 200
    bad = httpx.post(url + "/api/v1/predict", files={"file": ("x.png", b"hello, not an image", "image/png")},
                     timeout=30)
    assert bad.status_code == 422
    with gate.admitted():  # the only slot is taken: the next caller is refused at once
        busy = httpx.post(url + "/api/v1/predict", files={"file": ("7.png", digit, "image/png")}, timeout=30)
    assert busy.status_code == 503
    # feedback and a reviewer's decision: what must never show in /metrics
    pid = ok.json()["prediction_id"]
    httpx.post(url + "/api/v1/feedback", json={"prediction_id": pid, "label": "1"}, timeout=30).raise_for_status()
    parts.store.flush()
    item = parts.desk.next_item("alice")
    parts.desk.decide("alice", item.item_id, action="relabel", label="4", idempotency_key="k")
    parts.monitor.refresh()

    assert httpx.get(url + "/metrics", timeout=30).status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    r = httpx.get(url + "/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = families(r.text)
    version = parts.router.current.info.version
    assert value(fams, "loupe_requests", source="api", outcome="ok") == 1
    assert value(fams, "loupe_requests", source="api", outcome="rejected") == 1
    assert value(fams, "loupe_requests", source="api", outcome="busy") == 1
    assert value(fams, "loupe_requests", source="upload", outcome="ok") == 0
    assert value(fams, "loupe_predict_latency_seconds", "loupe_predict_latency_seconds_count", source="api") == 1
    assert value(fams, "loupe_prediction_confidence", "loupe_prediction_confidence_count", model=version) == 1
    assert value(fams, "loupe_model_info", role="current", version=version) == 1
    assert value(fams, "loupe_log_dropped") == 0
    assert value(fams, "loupe_review_queue_open", reason="audit") == 0  # decided
    assert value(fams, "loupe_review_queue_open", reason="high_loss") == 0
    assert value(fams, "loupe_drift_window_predictions", model=version) == 1
    assert value(fams, "loupe_monitor_last_check_timestamp_seconds") > 0
    # aggregates only: no prediction id, image id, reviewer or decision
    image = parts.store.transaction(lambda s: s.scalar(__import__("sqlalchemy").text(
        "SELECT image_sha256 FROM predictions WHERE id = :i").bindparams(i=pid)), read=True)
    for secret in (pid, image, image[:12], "alice", "relabel"):
        assert secret not in r.text, secret


def test_the_drift_gauges_follow_the_monitor(server):
    url, parts, _ = server
    # enough dark traffic for a check (min window 200): straight through the pipeline, as the front ends do
    rng = np.random.default_rng(0)
    images = []
    for _ in range(200):
        arr = rng.integers(0, 40, size=(64, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        images.append(Input(buf.getvalue(), "upload"))
    for i in range(0, 200, 8):
        parts.pipeline.predict(images[i:i + 8])
    parts.store.flush()
    parts.monitor.refresh()
    fams = families(httpx.get(url + "/metrics", headers=AUTH, timeout=30).text)
    version = parts.router.current.info.version
    assert value(fams, "loupe_drift_alarm", model=version, check="brightness") == 1
    assert value(fams, "loupe_drift_psi", model=version, check="brightness") > 0.25
    assert value(fams, "loupe_requests", source="upload", outcome="ok") == 200
    health = httpx.get(url + "/healthz", timeout=30).json()
    assert health["drift"]["status"] == "drifting" and health["status"] == "ok"


def test_failures_count_as_errors(tmp_path):
    kit = rf.build_kit(rf.make_settings(tmp_path, f"sqlite:///{tmp_path / 'l.db'}"))
    try:
        def broken(images):
            raise RuntimeError("model crashed")

        pipeline = kit.pipeline(broken)
        pipeline.observer = metrics = Metrics()
        with pytest.raises(RuntimeError):
            pipeline.predict([Input((DEMO_EXAMPLES_DIR / "digit_1.png").read_bytes(), "webcam")])
        empty = pipeline.predict([Input(None, "sketch")])  # an empty canvas is refused, not a model failure
        assert empty and empty[0] is not None
        fams = families(metrics.render()[0].decode())
        assert value(fams, "loupe_requests", source="webcam", outcome="error") == 1
        assert value(fams, "loupe_requests", source="sketch", outcome="rejected") == 1
    finally:
        kit.store.close()


def test_gradio_queue_refusals_are_counted():
    """Gradio's queue answers "queue is full" with a 503 on /gradio_api/queue/join before any handler of ours runs:
    the middleware counts exactly those (not other 503s, not other paths)."""
    async def join(request):
        return JSONResponse({"detail": "Queue is full."}, status_code=503 if request.query_params.get("full") else 200)

    metrics = Metrics()
    app = GradioBusyCounter(Starlette(routes=[Route("/gradio_api/queue/join", join, methods=["POST"]),
                                              Route("/review/gradio_api/queue/join", join, methods=["POST"])]),
                            metrics)
    client = TestClient(app)
    assert client.post("/gradio_api/queue/join?full=1").status_code == 503
    assert client.post("/gradio_api/queue/join").status_code == 200
    assert client.post("/review/gradio_api/queue/join?full=1").status_code == 503  # the reviewers' app: not traffic
    assert value(families(metrics.render()[0].decode()), "loupe_requests", source="gradio", outcome="busy") == 1


def test_candidates_show_in_the_model_info_and_get_their_own_drift_check(tmp_path):
    """Shadow/canary versions appear in loupe_model_info by role, and the monitor checks each serving version."""
    from dataclasses import replace

    from review.monitor import Monitor
    from serving.router import ModelRouter
    from tests.review_fixtures import MODEL, FakePredictor

    kit = rf.build_kit(rf.make_settings(tmp_path, f"sqlite:///{tmp_path / 'l.db'}"))
    try:
        current = FakePredictor(MODEL, lambda images: np.full((len(images), 3), 1 / 3))
        candidate = FakePredictor(replace(MODEL, sha256="ef" * 32), current.predict_probs)
        kit.store.register_model(candidate.info)
        router = ModelRouter(current)
        metrics = Metrics()
        monitor = Monitor(kit.store.settings, kit.store, router, metrics)
        for role in ("shadow", "canary"):
            router.set_candidate(candidate, role, 0.1)
            status = monitor.refresh()
            fams = families(metrics.render()[0].decode())
            assert value(fams, "loupe_model_info", role="current", version=MODEL.version) == 1
            assert value(fams, "loupe_model_info", role=role, version=candidate.info.version) == 1
            assert {v.role: v.version for v in status.versions} == {"current": MODEL.version,
                                                                     role: candidate.info.version}
            assert all(v.status == "no_reference" for v in status.versions)
        router.promote(candidate)
        monitor.refresh()
        fams = families(metrics.render()[0].decode())
        assert [s.labels["role"] for s in fams["loupe_model_info"].samples] == ["current"]
        assert {s.labels["model"] for s in fams["loupe_drift_window_predictions"].samples} == {candidate.info.version}
    finally:
        kit.store.close()
