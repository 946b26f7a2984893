"""Issue 6, High 1 and 2: no Gradio event reads a file the client did not upload; no request stops the server.

One real ``python app.py`` for the module, attacked over HTTP exactly as the issue describes: FileData paths naming
server files (the database, /etc/passwd, /proc/self/environ, an image outside the uploads, /dev/zero), with and
without ``meta``, as plain strings, as URLs (SSRF), nested in Sketchpad values and batches, through every route
shape Gradio offers (queue/join, call, call/v2, run, api, stream) on both apps. Evidence that nothing was read:
the guard's 403 at the door, no copy in Gradio's folder, no prediction row, no secret in any answer.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from review.db import Prediction
from settings import Settings
from tests.browser_support import start_app, wait_for
from tests.test_api import examples

CANARY = f"canary-{uuid.uuid4().hex}"
META = {"_type": "gradio.FileData"}
NOT_YOURS = "not uploaded in this session"


# --- the Gradio protocol, spoken over plain HTTP ----------------------------------------------------------------


def fn_index(client: httpx.Client, api_name: str, mount: str = "") -> int:
    deps = client.get(f"{mount}/config").json()["dependencies"]
    return next(d["id"] for d in deps if d["api_name"] == api_name)


def join(client: httpx.Client, fn: int, data: list, session: str, mount: str = "", **extra) -> httpx.Response:
    return client.post(f"{mount}/gradio_api/queue/join",
                       json={"data": data, "fn_index": fn, "session_hash": session, "event_data": None, **extra})


def outcome(client: httpx.Client, session: str, timeout: float = 30) -> dict:
    """The ``process_completed`` message of the session's (single) event."""
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}, timeout=timeout) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event stream ended without a result")


def upload(client: httpx.Client, data: bytes, name: str = "digit.png", **kw) -> str:
    r = client.post("/gradio_api/upload", files={"files": (name, data, "image/png")}, **kw)
    assert r.status_code == 200, r.text
    (path,) = r.json()
    return path


def ref(path, **extra) -> dict:
    return {"path": path, "meta": META, **extra}


def predict(client: httpx.Client, value, fn: int) -> dict:
    session = uuid.uuid4().hex
    r = join(client, fn, [value], session)
    assert r.status_code == 200, r.text
    return outcome(client, session)


def label_of(message: dict) -> str | None:
    return message["output"]["data"][0]["label"] if message.get("success") else None


# --- the app under attack -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_settings, demo_predictor):
    root = tmp_path_factory.mktemp("security-files")
    data = root / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")  # converted bundle: start-up is just imports
    gradio_parent = root / "gradio"
    proc = start_app(data, {"LOUPE_GRADIO_TEMP_DIR": str(gradio_parent), "SECURITY_TEST_CANARY": CANARY})
    from ui.upload_store import gradio_folder

    proc.folder = gradio_folder(Settings(data_dir=data, gradio_temp_dir=gradio_parent))
    secret = root / "secret.txt"
    secret.write_text(f"top secret {CANARY}\n")
    outside = root / "outside.png"  # a real image the model would classify, outside any upload
    info = PngInfo()
    info.add_text("canary", CANARY)  # so a copy of it is recognisable (and differs from the example's bytes)
    Image.open(examples()["3"]).save(outside, pnginfo=info)
    proc.targets = {"passwd": "/etc/passwd", "db": str(data / "loupe.db"), "environ": "/proc/self/environ",
                    "secret": str(secret), "image": str(outside)}
    yield proc
    proc.stop()  # the last test stops it with SIGTERM on purpose


@pytest.fixture
def client(app):
    with httpx.Client(base_url=app.url, timeout=10) as c:
        c.get("/config")  # the page load: sets the client cookie
        yield c


def rows(app) -> int:
    engine = create_engine(f"sqlite:///{app.data_dir / 'loupe.db'}")
    try:
        with Session(engine) as s:
            return s.scalar(select(func.count()).select_from(Prediction))
    finally:
        engine.dispose()


def settled_rows(app, client) -> int:
    """Rows once the background writer caught up: a fresh prediction's row is written after any earlier one."""
    before = rows(app)
    assert label_of(predict(client, ref(upload(client, examples()["5"].read_bytes())), fn_index(client, "predict")))
    return wait_for(lambda: rows(app) > before and rows(app), what="the control prediction's row") - 1


def copies_of_targets(app) -> list[Path]:
    """Files in Gradio's folder holding any target's bytes (what Gradio's copy-to-cache would leave)."""
    needles = [CANARY.encode(), b"root:x:0:0", b"SQLite format 3"]
    return [p for p in app.folder.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


# --- High 1: the issue's attack, then every payload shape on every route ----------------------------------------


def test_the_issue_attack_reads_nothing(app, client):
    before = settled_rows(app, client)
    fn = fn_index(client, "predict")
    for name, target in app.targets.items():
        session = f"attack-{name}"
        for payload in (ref(target), {"path": target}):  # with and without meta
            r = join(client, fn, [payload], session)
            assert r.status_code == 403 and NOT_YOURS in r.json()["detail"], (name, r.text)
            r = client.post("/gradio_api/call/predict", json={"data": [payload]})
            assert r.status_code == 403, (name, r.text)
        # the issue's second and third steps: a deep link naming the copy, then the file route serving it
        assert client.get("/gradio_api/deep_link", params={"session_hash": session}).status_code == 404
        for route in (f"/gradio_api/file={target}", f"/gradio_api/file=gradio-files/../../..{target}"):
            r = client.get(route)
            assert r.status_code == 404 and CANARY not in r.text and "root:x:0:0" not in r.text, route
    assert copies_of_targets(app) == []
    assert settled_rows(app, client) == before + 1  # only the control prediction itself


def _sketch(value) -> dict:
    return {"background": value, "layers": [value], "composite": value}


SHAPES = {
    "filedata": lambda t: ref(t),
    "no-meta": lambda t: {"path": t},
    "meta-with-url": lambda t: ref(t, url=f"http://127.0.0.1/gradio_api/file={t}"),
    "alias-traversal": lambda t: ref(f"gradio-files/../../../../../..{t}"),
    "sketch-composite": lambda t: {"background": None, "layers": [], "composite": ref(t)},
    "sketch-layer": lambda t: {"background": None, "layers": [{"path": t}], "composite": None},
    "sketch-background": lambda t: {"background": ref(t), "layers": [], "composite": None},
    "batch-list": lambda t: [ref(t), {"path": t}],
    "nested-props": lambda t: {"value": {"__type__": "update", "value": ref(t)}},
}


def _routes(client) -> dict:
    """route name -> send(payload) returning the HTTP response, for each way an event enters Gradio."""
    fns = {name: fn_index(client, name) for name in ("predict", "predict_webcam", "predict_sketch", "predict_stream")}

    def queue(name):
        return lambda p: join(client, fns[name], [p, None] if name == "predict_stream" else [p], uuid.uuid4().hex)

    def post(path):
        return lambda p: client.post(path, json={"data": [p], "fn_index": fns["predict"],
                                                 "session_hash": uuid.uuid4().hex})

    return {
        **{f"queue/join:{name}": queue(name) for name in fns},
        "queue/join:event_data": lambda p: join(client, fns["predict"], [None], uuid.uuid4().hex,
                                                event_data={"value": p}),
        "call": post("/gradio_api/call/predict"),
        "call/v2": lambda p: client.post("/gradio_api/call/v2/predict", json={"image": p}),
        "run": post("/gradio_api/run/predict"),
        "api": post("/gradio_api/api/predict"),
        "stream": post(f"/gradio_api/stream/{uuid.uuid4().hex}"),
        "review-app": lambda p: join(client, 0, [p], uuid.uuid4().hex, mount="/review"),
    }


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_payload_shape_on_every_route_is_refused_at_the_door(app, client, shape):
    for route, send in _routes(client).items():
        for name, target in app.targets.items():
            r = send(SHAPES[shape](target))
            assert r.status_code == 403, (route, name, r.status_code, r.text[:200])
    assert copies_of_targets(app) == []


def test_dev_zero_and_devices_are_refused_without_touching_them(app, client):
    for route, send in _routes(client).items():
        for device in ("/dev/zero", "/dev/urandom", "/proc/self/fd/0"):
            assert send(ref(device)).status_code == 403, (route, device)


def test_plain_string_path_reads_nothing(app, client):
    """A bare string is no file reference to the guard. Gradio's Image model refuses it today, and were it to pass,
    the model's handler would not open it either (test_handler_opens_only_what_the_upload_store_vouches_for)."""
    before = settled_rows(app, client)
    fn = fn_index(client, "predict")
    for target in (app.targets["image"], app.targets["passwd"], "gradio-files/../" + app.targets["image"]):
        assert not predict(client, target, fn)["success"]
    assert settled_rows(app, client) == before + 1


# --- SSRF -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def listener():
    """A 127.0.0.1 server that records every connection (an internal service the attacker wants reached)."""
    hits: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                hits.append(conn.recv(1024))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", hits
    stop.set()
    thread.join(5)
    server.close()


def test_urls_are_never_fetched(app, client, listener):
    url, hits = listener
    fn = fn_index(client, "predict")
    for payload in (ref(f"{url}/x.png"), {"path": None, "url": f"{url}/x.png"}, {"url": f"{url}/x.png"},
                    ref(None, url=f"{url}/x.png"), _sketch({"path": None, "url": f"{url}/x.png"})):
        r = join(client, fn, [payload], uuid.uuid4().hex)
        assert r.status_code == 403, (payload, r.text)
    assert client.get(f"/gradio_api/file={url}/x.png").status_code == 404
    assert client.get(f"/gradio_api/proxy={url}/x.png").status_code == 404
    assert hits == []


# --- what must keep working ---------------------------------------------------------------------------------------


def test_own_uploads_and_examples_work_and_uploads_are_bound_to_their_client(app):
    fn_by = {}
    with httpx.Client(base_url=app.url, timeout=10) as alice, httpx.Client(base_url=app.url, timeout=10) as bob:
        alice.get("/")
        bob.get("/")
        fn_by["predict"] = fn_index(alice, "predict")
        path = upload(alice, examples()["7"].read_bytes())
        assert not path.startswith("/") and path.startswith("gradio-files/uploads/")
        # Bob cannot use or fetch Alice's upload, even knowing its path
        assert join(bob, fn_by["predict"], [ref(path)], "bob").status_code == 403
        assert bob.get(f"/gradio_api/file={path}").status_code == 404
        assert alice.get(f"/gradio_api/file={path}").status_code == 200  # the page's preview
        assert label_of(predict(alice, ref(path, url=f"{app.url}/gradio_api/file={path}"), fn_by["predict"])) == "7"
        # a Sketchpad value of Alice's own uploads
        parts = {k: upload(alice, examples()["1"].read_bytes(), f"{k}.png") for k in ("background", "layer", "composite")}
        sketch = {"background": ref(parts["background"]), "layers": [ref(parts["layer"])],
                  "composite": ref(parts["composite"])}
        assert label_of(predict(alice, sketch, fn_index(alice, "predict_sketch"))) == "1"
        # the example images are Gradio's copies, offered to everyone by the page itself
        config = bob.get("/config").json()
        sample = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "examples")
        example = sample["props"]["samples"][4][0]
        assert bob.get(f"/gradio_api/file={example['path']}").status_code == 200
        assert label_of(predict(bob, example, fn_by["predict"])) == "4"


def test_cookieless_client_holds_its_upload_by_its_random_path(app):
    """A browser that refuses cookies (a Space's iframe in some browsers) still works; nobody else can use it."""
    r = httpx.post(app.url + "/gradio_api/upload", files={"files": ("d.png", examples()["2"].read_bytes())})
    assert r.status_code == 200 and "loupe_client=" in r.headers["set-cookie"]
    (path,) = r.json()
    with httpx.Client(base_url=app.url, timeout=10) as no_cookies:
        fn = fn_index(no_cookies, "predict")
        no_cookies.cookies.clear()  # /config set one: this client keeps refusing it
        session = uuid.uuid4().hex
        assert join(no_cookies, fn, [ref(path)], session).status_code == 200
        assert label_of(outcome(no_cookies, session)) == "2"
    with httpx.Client(base_url=app.url, timeout=10) as other:
        other.get("/config")
        assert join(other, fn, [ref(path)], uuid.uuid4().hex).status_code == 403


def test_gradio_client_still_works(app):
    from gradio_client import Client, handle_file

    label, info, _ = Client(app.url, verbose=False).predict(handle_file(str(examples()["8"])), api_name="/predict")
    assert label["label"] == "8" and "ms" in info


def test_unneeded_gradio_routes_are_gone(app, client):
    for method, route in [("GET", "/gradio_api/deep_link?session_hash=x"), ("POST", "/gradio_api/component_server"),
                          ("POST", "/gradio_api/process_recording"), ("GET", "/gradio_api/proxy=http://x/y"),
                          ("GET", "/gradio_api/file/etc/passwd"), ("GET", "/monitoring"), ("GET", "/review/monitoring"),
                          ("POST", "/gradio_api/vibe-edit"), ("GET", "/gradio_api/dev/reload"),
                          ("GET", "/gradio_api/run-history/buckets"), ("POST", "/review/gradio_api/upload"),
                          ("GET", "/gradio_api/stream/s/0/1/playlist.m3u8")]:
        assert client.request(method, route).status_code == 404, route


def test_handler_opens_only_what_the_upload_store_vouches_for(tmp_path, demo_predictor):
    """The second layer on its own, without a server: PredictHandlers.read with the real UploadStore."""
    from serving.imageio import ImageRejected
    from ui.predict_handlers import PredictHandlers
    from ui.upload_store import READ_GRACE_S, UploadStore

    now = [0.0]
    store = UploadStore(tmp_path / "g", ttl_s=60, budget_bytes=1 << 30, disk_bytes=1 << 30, clock=lambda: now[0])
    h = PredictHandlers(Settings(data_dir=tmp_path / "d"), None, None, store)
    outside = tmp_path / "outside.png"
    outside.write_bytes(examples()["3"].read_bytes())
    for payload in (str(outside), {"path": str(outside)}, ref(str(outside)), {"composite": ref(str(outside))}):
        with pytest.raises(ImageRejected, match="not one you uploaded"):
            h.read(payload)
    assert PredictHandlers(Settings(data_dir=tmp_path / "d"), None, None).read({"path": None}) is None
    folder = store.new_dir()
    mine = folder / "d.png"
    mine.write_bytes(outside.read_bytes())
    assert store.admit("a", 10) is None
    store.register(str(mine), owner="c", cookieless=False, size=mine.stat().st_size, reserved=10)
    assert h.read(ref(str(mine))) == outside.read_bytes()
    now[0] += READ_GRACE_S + 0.1  # read once: gone a few seconds later
    assert store.sweep() == 1 and not folder.exists()
    with pytest.raises(ImageRejected):
        h.read(ref(str(mine)))


# --- High 2: one request must not stop the server (this test stops it on purpose: keep it last) ---------------------


def _health_ms(url: str, n: int = 7) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def test_dev_zero_leaves_health_prompt_and_sigterm_stops_the_server(app, client):
    quiet = _health_ms(app.url)
    fn = fn_index(client, "predict")
    for payload in (ref("/dev/zero"), {"path": "/dev/zero"}, _sketch(ref("/dev/zero")), "/dev/zero"):
        join(client, fn, [payload], uuid.uuid4().hex)
        client.post("/gradio_api/call/predict", json={"data": [payload]})
    after = _health_ms(app.url)
    # generous: a noisy shared box; a hung event loop would not answer at all (10 s timeout)
    assert after < max(1000.0, 20 * quiet), (quiet, after)
    assert label_of(predict(client, ref(upload(client, examples()["6"].read_bytes())), fn)) == "6"
    print(f"/healthz p50 quiet {quiet:.1f} ms, after /dev/zero payloads {after:.1f} ms")
    app.proc.send_signal(signal.SIGTERM)
    try:
        code = app.proc.wait(20)
    except subprocess.TimeoutExpired:
        app.proc.kill()
        pytest.fail("the server ignored SIGTERM")
    # uvicorn shuts down gracefully, then re-raises SIGTERM, whose default action ends the process (code -15).
    assert code in (0, -signal.SIGTERM) and "Finished server process" in app.log(), (code, app.log())
