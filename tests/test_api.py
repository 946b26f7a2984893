"""REST API (/api/v1/predict, /healthz) on the real demo model, the Gate's 503, Gradio's queue limit, and a
gradio_client call against a real ``python app.py`` subprocess. Also home of the bad-input catalogue that
test_ui_predict.py runs through the UI handlers (issue 2, item 9)."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from sqlalchemy import inspect, select

from model.predictor import ModelInfo
from review.db import Prediction
from serving.gate import Gate
from settings import Settings
from tests.app_support import app_parts, server_for, serving

MB = 1 << 20
UPLOAD_MB = 0.5  # a small limit keeps the over-size case cheap
TOL = 1e-5


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height (decoding it would need gigabytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("photo.jpg", b"not really")
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    data = png(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)), "JPEG", quality=90)
    return data[: len(data) // 2]


@dataclass(frozen=True)
class Bad:
    name: str  # file name as uploaded (lies about the type on purpose)
    data: bytes
    status: int  # REST status
    message: str  # part of the user-facing message


def bad_inputs(max_bytes: int) -> list[Bad]:
    """Every refusal of issue 2 item 9, as the bytes a user would send."""
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200
    return [
        Bad("empty.jpg", b"", 422, "empty (0 bytes)"),
        Bad("notes.jpg", b"Shopping list:\n- milk\n- eggs\n" * 4, 422, "text file, not an image"),
        Bad("page.jpg", b"<!DOCTYPE html><html><body><img src='x.jpg'></body></html>", 422, "web page (HTML)"),
        Bad("doc.jpg", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 422, "PDF document"),
        Bad("archive.jpg", zip_bytes(), 422, "ZIP archive"),
        Bad("cut.jpg", truncated_jpeg(), 422, "truncated or corrupt"),
        Bad("bomb.png", header_only_png(50_000, 50_000), 422, "pixels"),
        Bad("huge.jpg", b"\xff\xd8\xff\xe0" + b"\0" * max_bytes, 413, "too large"),
        Bad("logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>', 422, "SVG"),
        Bad("photo.heic", heic, 422, "HEIC"),
    ]


def rotated_with_exif(img: Image.Image) -> bytes:
    """JPEG whose pixels are ``img`` turned 90 degrees, tagged so that a viewer turns it back (Orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"; exif_transpose undoes ROTATE_90 (CCW)
    return png(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def animated_gif(first: Image.Image, second: Image.Image) -> bytes:
    return png(first, "GIF", save_all=True, append_images=[second], duration=200, loop=0)


def examples() -> dict[str, Path]:
    from model.demo import DEMO_EXAMPLES_DIR

    return {p.stem.removeprefix("digit_"): p for p in sorted(Path(DEMO_EXAMPLES_DIR).glob("digit_*.png"))}


def stored(service) -> tuple[int, int]:
    """(rows in all review tables, image files on disk) once every pending write has landed."""
    service.store.flush()
    rows = 0
    with service.store.engine.connect() as conn:
        for table in inspect(service.store.engine).get_table_names():
            rows += conn.exec_driver_sql(f'SELECT COUNT(*) FROM "{table}"').scalar_one()  # noqa: S608 (own names)
    files = sum(1 for p in Path(service.store.settings.images_dir).rglob("*") if p.is_file())
    return rows, files


def predictions(service, **where) -> list[Prediction]:
    service.store.flush()
    with service.store._sessions() as s:
        q = select(Prediction).filter_by(**where).order_by(Prediction.created)
        return list(s.scalars(q))


@pytest.fixture(scope="module")
def api(tmp_path_factory, demo_predictor):
    settings = Settings(data_dir=tmp_path_factory.mktemp("api-data"), max_upload_mb=UPLOAD_MB)
    service = app_parts(settings, demo_predictor)
    with TestClient(server_for(settings, service)) as client:
        yield client, service, settings
    service.store.close()


def post(client, name: str, data: bytes, ctype: str = "image/jpeg"):
    return client.post("/api/v1/predict", files={"file": (name, data, ctype)})


def test_healthz_and_model(api, demo_predictor):
    client, _, _ = api
    health = client.get("/healthz").json()
    assert {k: health[k] for k in ("status", "model")} == {"status": "ok", "model": demo_predictor.info.version}
    assert set(health) == {"status", "model", "drift"}  # drift: the monitor's latest check (tests/test_monitor.py)
    model = client.get("/api/v1/model").json()
    assert model["classes"] == list(demo_predictor.info.vocab) and model["sha256"] == demo_predictor.info.sha256


def test_feedback_over_rest_reaches_the_prediction(api):
    client, service, _ = api
    answer = post(client, "3.png", examples()["3"].read_bytes(), "image/png").json()
    pid = answer["prediction_id"]
    assert "/api/v1/feedback" in client.get("/api/openapi.json").json()["paths"]
    assert client.post("/api/v1/feedback", json={"prediction_id": pid, "label": "8"}).json() == {"status": "recorded"}
    (row,) = predictions(service, id=pid)
    assert row.claimed_label == "8" and row.feedback_correct is False and row.loss > 1  # a confident "3"
    bad = client.post("/api/v1/feedback", json={"prediction_id": pid, "label": "banana"})
    assert bad.status_code == 422 and "not one of the model's classes" in bad.json()["error"]
    unknown = client.post("/api/v1/feedback", json={"prediction_id": "0" * 32, "correct": True})
    assert unknown.status_code == 404 and "unknown prediction" in unknown.json()["error"]
    assert client.post("/api/v1/feedback", json={"prediction_id": pid}).status_code == 422  # nothing said
    assert client.post("/api/v1/feedback", json={"label": "8"}).status_code == 422  # no id


@pytest.mark.parametrize("digit", [str(d) for d in range(10)])
def test_predict_demo_example(api, demo_predictor, digit):
    client, service, _ = api
    path = examples()[digit]
    r = post(client, path.name, path.read_bytes(), "image/png")
    assert r.status_code == 200, r.text
    body = r.json()
    expected = demo_predictor.predict_probs([Image.open(path).convert("RGB")])[0]
    vocab = demo_predictor.info.vocab
    assert list(body["probabilities"]) == list(vocab)  # all classes, vocab order
    np.testing.assert_allclose([body["probabilities"][c] for c in vocab], expected, atol=TOL)
    assert body["label"] == digit == vocab[int(expected.argmax())]
    assert body["confidence"] == pytest.approx(float(expected.max()), abs=TOL)
    assert [t["label"] for t in body["top_k"]][0] == digit and len(body["top_k"]) == 5
    assert body["model"]["version"] == demo_predictor.info.version and body["model"]["backend"] in ("onnx", "torch")
    assert body["latency_ms"] > 0
    (row,) = predictions(service, id=body["prediction_id"])
    assert row.source == "api" and row.predicted == digit and row.image_sha256 is not None


def test_bad_inputs_are_refused_clearly_and_nothing_is_stored(api):
    client, service, settings = api
    before = stored(service)
    for bad in bad_inputs(int(settings.max_upload_mb * MB)):
        r = post(client, bad.name, bad.data)
        assert r.status_code == bad.status, (bad.name, r.text)
        assert bad.message in r.json()["error"], (bad.name, r.json())
        assert client.get("/healthz").status_code == 200
    assert stored(service) == before
    # The count above is honest only if a stored prediction would show: one new good image must.
    img = Image.open(examples()["3"]).convert("RGB")
    img.putpixel((0, 0), (254, 254, 254))  # new content, so a new stored file (images are content-addressed)
    assert post(client, "ok.png", png(img), "image/png").status_code == 200
    rows, files = stored(service)
    assert rows > before[0] and files == before[1] + 1


def test_oversize_refused_from_content_length_before_reading(api):
    client, _, settings = api
    size = int(settings.max_upload_mb * MB) + 200_000
    r = post(client, "big.png", b"\0" * size)
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_request_shape_errors(api):
    client, _, _ = api
    assert client.post("/api/v1/predict", content=b"raw", headers={"content-type": "image/png"}).status_code == 415
    r = client.post("/api/v1/predict", files={"image": ("a.png", b"x", "image/png")})
    assert r.status_code == 422 and "'file'" in r.json()["error"]


@pytest.mark.parametrize("size", [(1, 1), (1, 20000)])
def test_degenerate_sizes_accepted(api, size):
    client, _, _ = api
    r = post(client, "thin.png", png(Image.new("RGB", size, "white")), "image/png")
    assert r.status_code == 200, r.text
    assert sum(r.json()["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def test_animated_gif_uses_first_frame(api, demo_predictor):
    client, _, _ = api
    ex = examples()
    first, second = Image.open(ex["3"]).convert("RGB"), Image.open(ex["8"]).convert("RGB")
    data = animated_gif(first, second)
    r = post(client, "anim.gif", data, "image/gif")
    assert r.status_code == 200, r.text
    frame0 = Image.open(io.BytesIO(data)).convert("RGB")  # Pillow opens at frame 0
    expected = demo_predictor.predict_probs([frame0])[0]
    np.testing.assert_allclose(list(r.json()["probabilities"].values()), expected, atol=TOL)
    assert r.json()["label"] == "3"


def test_exif_rotated_jpeg_is_turned_upright_exactly_once(api, demo_predictor):
    client, _, _ = api
    digit, img = upright_sensitive_digit(demo_predictor)
    data = rotated_with_exif(img)
    r = post(client, "rotated.jpg", data)
    assert r.status_code == 200, r.text
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert upright.size == img.size
    np.testing.assert_allclose(list(r.json()["probabilities"].values()),
                               demo_predictor.predict_probs([upright])[0], atol=TOL)
    assert r.json()["label"] == digit  # would differ if the rotation were ignored or applied twice


def upright_sensitive_digit(predictor) -> tuple[str, Image.Image]:
    """A demo example the model gets right upright but not turned by 90 or 180 degrees (so the test can fail)."""
    vocab = predictor.info.vocab
    for digit, path in examples().items():
        img = Image.open(path).convert("RGB")
        turned = [img, img.transpose(Image.Transpose.ROTATE_90), img.transpose(Image.Transpose.ROTATE_180),
                  img.transpose(Image.Transpose.ROTATE_270)]
        labels = [vocab[int(i)] for i in predictor.predict_probs(turned).argmax(axis=1)]
        if labels[0] == digit and digit not in labels[1:]:
            return digit, img
    pytest.fail("no demo example is orientation-sensitive for this model")


# --- overload ----------------------------------------------------------------------------------------------


class HeldPredictor:
    """Wraps the real predictor; each call waits until the test releases it (deterministic saturation)."""

    def __init__(self, inner):
        self.info: ModelInfo = inner.info
        self._inner = inner
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def predict_probs(self, images):
        self.entered.release()
        assert self.release.wait(30), "test never released the predictor"
        return self._inner.predict_probs(images)


def test_rest_busy_gets_fast_503_with_retry_after(tmp_path, demo_predictor):
    settings = Settings(data_dir=tmp_path / "data")
    held = HeldPredictor(demo_predictor)
    service = app_parts(settings, held)
    app = server_for(settings, service, gate=Gate(concurrency=1, max_waiting=0))
    data = examples()["5"].read_bytes()
    results = []
    try:
        with TestClient(app) as client:
            first = threading.Thread(target=lambda: results.append(post(client, "a.png", data, "image/png")))
            first.start()
            assert held.entered.acquire(timeout=30)
            start = time.perf_counter()
            busy = post(client, "b.png", data, "image/png")
            elapsed = time.perf_counter() - start
            held.release.set()
            first.join(30)
            after = post(client, "c.png", data, "image/png")
    finally:
        held.release.set()
        service.store.close()
    assert busy.status_code == 503 and "busy" in busy.json()["error"] and busy.headers["retry-after"].isdigit()
    assert elapsed < 2.0  # told at once, not after waiting
    assert results[0].status_code == 200 and after.status_code == 200


def test_gradio_queue_full_answers_busy_at_once(tmp_path, demo_predictor):
    """Gradio's own path: model workers busy + queue_max_size waiting -> the next caller is refused at once."""
    from gradio_client import Client, handle_file

    from ui.predict_tab import model_workers

    settings = Settings(data_dir=tmp_path / "data", queue_max_size=1, max_batch_size=1)
    held = HeldPredictor(demo_predictor)
    service = app_parts(settings, held)
    try:
        with serving(settings, service) as base:
            try:
                client = Client(base + "/", verbose=False)
                image = handle_file(str(examples()["4"]))
                running = []
                for _ in range(model_workers(settings)):  # one by one: with queue_max_size=1 a burst is refused
                    running.append(client.submit(image, api_name="/predict"))
                    assert held.entered.acquire(timeout=30)
                waiting = client.submit(image, api_name="/predict")
                _wait_until_queued(waiting)
                start = time.perf_counter()
                refused = client.submit(image, api_name="/predict")
                with pytest.raises(Exception, match="(?i)queue is full"):
                    refused.result(timeout=20)
                elapsed = time.perf_counter() - start
                held.release.set()
                answers = [job.result(timeout=30) for job in [*running, waiting]]
            finally:
                held.release.set()
    finally:
        service.store.close()
    assert elapsed < 5  # refused at once (the held jobs would take 30 s)
    assert [a[0]["label"] for a in answers] == ["4"] * len(answers)


class RecordingPredictor:
    """The real demo predictor, recording the size of every forward pass; the first pass waits for the test."""

    def __init__(self, inner):
        self.info: ModelInfo = inner.info
        self._inner = inner
        self.runs: list[int] = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def prepare(self, images):
        return self._inner.prepare(images)

    def run(self, batch, alone=True):
        self.runs.append(len(batch))
        self.entered.release()
        if len(self.runs) == 1:
            assert self.release.wait(30), "test never released the predictor"
        return self._inner.run(batch, alone)

    def predict_probs(self, images):
        return self._inner.predict_probs(images)


def _wait_pending(pipeline, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(pipeline.batcher._pending) < n:
        assert time.monotonic() < deadline, f"{len(pipeline.batcher._pending)} of {n} predictions reached the model"
        time.sleep(0.01)


def test_rest_requests_waiting_for_the_model_share_one_forward_pass(tmp_path, demo_predictor):
    """Issue 7 item 15: REST requests that wait while the model is busy run as ONE batch, not one by one (this
    needs both the batcher and enough REST run slots for several to reach it)."""
    settings = Settings(data_dir=tmp_path / "data", model_workers=1)
    recording = RecordingPredictor(demo_predictor)
    service = app_parts(settings, recording)
    app = server_for(settings, service)  # the default Gate, as main() builds it
    digits = ["1", "2", "3", "4", "5"]
    results: dict[str, object] = {}

    def send(d: str) -> threading.Thread:
        t = threading.Thread(target=lambda: results.__setitem__(d, post(client, f"{d}.png", examples()[d].read_bytes(),
                                                                        "image/png")))
        t.start()
        return t

    try:
        with TestClient(app) as client:
            threads = [send(digits[0])]
            assert recording.entered.acquire(timeout=30)
            threads += [send(d) for d in digits[1:]]
            _wait_pending(service.pipeline, len(digits) - 1)
            recording.release.set()
            for t in threads:
                t.join(30)
    finally:
        recording.release.set()
        service.store.close()
    assert recording.runs == [1, len(digits) - 1]
    for d in digits:
        body = results[d].json()
        assert results[d].status_code == 200 and body["label"] == d
        expected = demo_predictor.predict_probs([Image.open(examples()[d]).convert("RGB")])[0]
        assert np.allclose([body["probabilities"][c] for c in demo_predictor.info.vocab], expected, atol=TOL)


def test_gradio_and_rest_requests_share_one_forward_pass(tmp_path, demo_predictor):
    """One batcher for every front end: a Gradio call and a REST call waiting together run in one batch."""
    import httpx
    from gradio_client import Client, handle_file

    settings = Settings(data_dir=tmp_path / "data", model_workers=1)
    recording = RecordingPredictor(demo_predictor)
    service = app_parts(settings, recording)
    try:
        with serving(settings, service) as base:
            try:
                client = Client(base + "/", verbose=False)

                def rest(d: str):
                    return httpx.post(base + "/api/v1/predict", timeout=60,
                                      files={"file": (f"{d}.png", examples()[d].read_bytes(), "image/png")})

                rest_results: list = []
                first = threading.Thread(target=lambda: rest_results.append(rest("7")))
                first.start()
                assert recording.entered.acquire(timeout=30)
                gradio_job = client.submit(handle_file(str(examples()["4"])), api_name="/predict")
                second = threading.Thread(target=lambda: rest_results.append(rest("2")))
                second.start()
                _wait_pending(service.pipeline, 2)
                recording.release.set()
                gradio_answer = gradio_job.result(timeout=30)
                first.join(30)
                second.join(30)
            finally:
                recording.release.set()
    finally:
        service.store.close()
    assert recording.runs == [1, 2]
    assert gradio_answer[0]["label"] == "4"
    assert sorted(r.json()["label"] for r in rest_results) == ["2", "7"]


def _wait_until_queued(job, timeout: float = 20) -> None:
    from gradio_client.utils import Status

    deadline = time.monotonic() + timeout
    while job.status().code not in (Status.IN_QUEUE, Status.QUEUE_FULL) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.status().code == Status.IN_QUEUE, job.status()


# --- a real `python app.py` -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_process(tmp_path_factory, demo_settings, demo_predictor):
    import shutil

    from tests.browser_support import start_app

    data = tmp_path_factory.mktemp("app") / "data"
    # Reuse the bundle the session already converted: start-up then costs imports, not a conversion.
    shutil.copytree(demo_settings.cache_dir, data / "cache")
    app = start_app(data, {"LOUPE_MAX_UPLOAD_MB": str(UPLOAD_MB)})
    yield app
    assert app.stop() == 0, app.log()


def test_gradio_client_and_rest_against_real_server(app_process, tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    client = Client(app_process.url, verbose=False)
    label, info, details = client.predict(handle_file(str(examples()["7"])), api_name="/predict")
    assert label["label"] == "7" and "ms" in info and "@" in info
    assert details["label"] == "7" and details["model"] in info and len(details["prediction_id"]) == 32
    # feedback on that answer, through gradio_client too: it reaches the database
    assert client.predict(details["prediction_id"], False, "1", api_name="/feedback") == "recorded"
    with pytest.raises(Exception, match="not one of the model's classes"):
        client.predict(details["prediction_id"], None, "banana", api_name="/feedback")
    from sqlalchemy import create_engine

    from tests.browser_support import wait_for

    engine = create_engine(f"sqlite:///{app_process.data_dir / 'loupe.db'}")
    row = wait_for(lambda: engine.connect().execute(select(Prediction.claimed_label, Prediction.feedback_correct)
                                                    .where(Prediction.id == details["prediction_id"],
                                                           Prediction.claimed_label.is_not(None))).first(),
                   timeout=30, what="the feedback row")
    engine.dispose()
    assert tuple(row) == ("1", False)
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"just some text, renamed\n" * 3)
    with pytest.raises(Exception, match="text file, not an image"):
        client.predict(handle_file(str(bad)), api_name="/predict")
    r = httpx.post(app_process.url + "/api/v1/predict", files={"file": ("7.png", examples()["7"].read_bytes())})
    assert r.status_code == 200 and r.json()["label"] == "7"
    r = httpx.post(app_process.url + "/api/v1/predict", files={"file": ("bad.jpg", bad.read_bytes())})
    assert r.status_code == 422 and "text file" in r.json()["error"]
    assert httpx.get(app_process.url + "/healthz").json()["status"] == "ok"
    # Gradio's file route must not serve our data dir (stored uploads, database).
    db = app_process.data_dir / "loupe.db"
    assert db.exists()
    from model.demo import DEMO_EXPORT

    for path in (db, DEMO_EXPORT.resolve()):
        for route in (f"/gradio_api/file={path}", f"/file={path}"):
            assert httpx.get(app_process.url + route).status_code in (403, 404), route
    # Hardening: only /predict is advertised, no monitoring dashboard, the review app needs a login.
    assert list(httpx.get(app_process.url + "/gradio_api/info").json()["named_endpoints"]) == ["/predict", "/feedback"]
    assert httpx.get(app_process.url + "/monitoring").status_code in (403, 404)
    assert httpx.get(app_process.url + "/review/config").status_code == 401


def test_sigterm_flushes_every_acknowledged_prediction(tmp_path, demo_settings, demo_predictor):
    """Docker stops a container with SIGTERM: every prediction answered before it is in the database after."""
    import shutil
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from sqlalchemy import create_engine, func

    from tests.browser_support import start_app

    data = tmp_path / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")
    app = start_app(data)
    payload = examples()["5"].read_bytes()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: httpx.post(app.url + "/api/v1/predict", timeout=60,
                                                         files={"file": (f"{i}.png", payload)}), range(40)))
        ids = {r.json()["prediction_id"] for r in answers if r.status_code == 200}
        app.proc.send_signal(signal.SIGTERM)  # at once: the background writer has not caught up yet
        code = app.proc.wait(30)
    finally:
        app.stop()
    assert len(ids) == 40 and code == 0, app.log()
    engine = create_engine(f"sqlite:///{data / 'loupe.db'}")
    with engine.connect() as c:
        stored = set(c.execute(select(Prediction.id)).scalars())
        assert c.execute(select(func.count()).select_from(Prediction)).scalar() == 40
    engine.dispose()
    assert ids == stored


def test_bad_model_file_is_a_clear_startup_error(tmp_path):
    import subprocess
    import sys

    from tests.browser_support import REPO

    model = tmp_path / "export.pkl"
    model.write_bytes(b"not a pickle")
    env = {"LOUPE_MODEL_PATH": str(model), "LOUPE_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(REPO / "app.py")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert str(model) in out.stderr and "LOUPE_MODEL_SHA256=" in out.stderr
    assert "Traceback" not in out.stderr
