"""Issue 6, Medium 6 and 8 (CORS, headers) and Low (server paths): Gradio's upload route cannot fill the disk,
Loupe's Gradio folder is emptied at start-up, "not stored" is true, no other origin may read anything, every
response carries the security headers, and no response names a server folder.

One real ``python app.py`` for the module with small limits (0.5 MB uploads, 2 MB per client address, 3 MB on
disk, unused uploads kept 5 s, LOUPE_STORE_UPLOADS=false). Client addresses are varied with 127.0.0.x source
addresses, so each test has budgets of its own.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import time
import uuid

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from review.auth import hash_password
from settings import Settings
from tests.browser_support import REPO, start_app, wait_for
from tests.test_api import examples
from tests.test_security_files import fn_index, join, label_of, outcome, predict, ref, upload

PASSWORD = "review me"
UPLOAD_MB, BUDGET_MB, DISK_MB, TTL_S = 0.5, 2, 3, 5
PART = 450_000  # bytes of one test upload: 4 fit a 2 MB budget (with multipart framing), a 5th does not
MB = 1 << 20


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_settings, demo_predictor):
    from ui.upload_store import MARKER, gradio_folder

    root = tmp_path_factory.mktemp("security-http")
    data = root / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")
    parent = root / "gradio"
    folder = gradio_folder(Settings(data_dir=data, gradio_temp_dir=parent))
    # What a kill -9 leaves: uploads and Gradio's copies that no clean-up ever saw.
    (folder / "uploads" / "old").mkdir(parents=True)
    (folder / "uploads" / "old" / "someone.png").write_bytes(b"x" * 1000)
    (folder / ("0" * 64)).mkdir()
    (folder / ("0" * 64) / "copy.png").write_bytes(b"y" * 1000)
    (folder / MARKER).touch()
    env = {"LOUPE_GRADIO_TEMP_DIR": str(parent), "LOUPE_MAX_UPLOAD_MB": str(UPLOAD_MB),
           "LOUPE_UPLOAD_BUDGET_MB": str(BUDGET_MB), "LOUPE_UPLOAD_DISK_MB": str(DISK_MB),
           "LOUPE_UPLOAD_TTL_S": str(TTL_S), "LOUPE_STORE_UPLOADS": "false",
           "LOUPE_REVIEWERS": f"alice:{hash_password(PASSWORD, iterations=1000)}"}
    proc = start_app(data, env)
    proc.folder = folder
    yield proc
    assert proc.stop() == 0, proc.log()


@contextlib.contextmanager
def client_at(app, last_octet: int):
    """A client whose connections come from 127.0.0.<last_octet>: another address, another budget."""
    transport = httpx.HTTPTransport(local_address=f"127.0.0.{last_octet}")
    with httpx.Client(base_url=app.url, timeout=10, transport=transport) as c:
        c.get("/config")  # the page load: sets the client cookie
        yield c


def uploads_on_disk(app) -> list:
    return [p for p in (app.folder / "uploads").rglob("*") if p.is_file()]


def no_uploads_left(app) -> None:
    """Start from an empty uploads folder (earlier tests' files expire after TTL_S)."""
    wait_for(lambda: not uploads_on_disk(app), timeout=TTL_S + 10, what="earlier uploads to expire")


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    body += f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def raw_request(app, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, float]:
    """Send exactly these bytes (a client that announces more than it sends, say); (status, seconds to answer)."""
    host, port = app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        start = time.perf_counter()
        s.sendall(head.encode() + body)
        answer = s.recv(4096)
        elapsed = time.perf_counter() - start
    return int(answer.split(b" ", 2)[1]), elapsed


# --- Medium 6: disk fill through the upload route ---------------------------------------------------------------


def test_leftovers_of_a_killed_run_are_removed_at_start(app):
    assert not (app.folder / "uploads" / "old").exists()
    assert not (app.folder / ("0" * 64)).exists()


def test_start_up_empties_only_a_folder_that_is_loupes(tmp_path):
    from ui.upload_store import MARKER, GradioFolderError, prepare_folder

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "their.txt").write_text("not Loupe's")
    with pytest.raises(GradioFolderError, match="did not write"):
        prepare_folder(foreign)
    assert (foreign / "their.txt").exists()
    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(GradioFolderError, match="not a directory"):
        prepare_folder(link)
    ours = tmp_path / "ours"
    prepare_folder(ours)
    (ours / "uploads" / "x").mkdir(parents=True)
    (ours / "uploads" / "x" / "a.png").write_bytes(b"a")
    prepare_folder(ours)
    assert sorted(p.name for p in ours.iterdir()) == [MARKER]


def test_many_parts_in_one_request_are_refused_and_nothing_is_kept(app):
    no_uploads_left(app)
    with client_at(app, 10) as c:
        for n in (2, 100):
            body, headers = multipart([(f"p{i}.png", os.urandom(4000)) for i in range(n)])
            r = c.post("/gradio_api/upload", content=body, headers=headers)
            assert r.status_code == 400 and "file" in r.json()["detail"].lower(), r.text
        assert uploads_on_disk(app) == []
        path = upload(c, examples()["4"].read_bytes())  # one part is what the UI sends, and it works
        assert len(uploads_on_disk(app)) == 1 and path.endswith("/digit.png")


def test_oversize_upload_is_refused_from_its_content_length_before_the_body(app):
    """The issue's 100 parts of 9.9 MB (990 MB), announced but never sent: refused at once, nothing written."""
    no_uploads_left(app)
    boundary = "b0undary"
    head = (f"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {100 * 9_900_000}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n")
    status, seconds = raw_request(app, head)
    print(f"990 MB announced: {status} after {seconds * 1000:.0f} ms")
    assert status == 413 and seconds < 5
    chunked = (f"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n")
    assert raw_request(app, chunked)[0] == 411
    with client_at(app, 11) as c:
        body, headers = multipart([("big.png", b"\0" * int(UPLOAD_MB * MB + 1))])
        assert c.post("/gradio_api/upload", content=body, headers=headers).status_code == 413
    assert uploads_on_disk(app) == []


def test_bytes_per_client_address_are_budgeted(app):
    no_uploads_left(app)
    data = os.urandom(PART)
    with client_at(app, 20) as greedy, client_at(app, 21) as other:
        accepted = 0
        while (r := greedy.post("/gradio_api/upload", files={"files": ("a.png", data)})).status_code == 200:
            accepted += 1
            assert accepted < 10, "no budget"
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert accepted == int(BUDGET_MB * MB // (PART + 1000))
        assert other.post("/gradio_api/upload", files={"files": ("b.png", data)}).status_code == 200


def test_uploads_held_on_disk_are_capped_for_all_clients_together(app):
    no_uploads_left(app)
    data = os.urandom(PART)
    statuses = []
    for octet in (30, 31, 32):
        with client_at(app, octet) as c:
            statuses += [c.post("/gradio_api/upload", files={"files": ("a.png", data)}).status_code for _ in range(3)]
    assert statuses.count(200) == int(DISK_MB * MB // (PART + 1000)) and 503 in statuses
    assert sum(p.stat().st_size for p in uploads_on_disk(app)) <= DISK_MB * MB
    no_uploads_left(app)  # unused uploads expire after TTL_S; then there is room again
    with client_at(app, 33) as c:
        assert c.post("/gradio_api/upload", files={"files": ("a.png", data)}).status_code == 200


def unique_png(digit: str) -> bytes:
    """A demo digit with a random text chunk: bytes no other file has, so every copy of it can be found."""
    info = PngInfo()
    info.add_text("nonce", uuid.uuid4().hex)
    buf = io.BytesIO()
    Image.open(examples()[digit]).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def copies(app, data: bytes) -> list:
    """Files holding these bytes anywhere Loupe or Gradio write: Loupe's Gradio folder, the data dir, temp files."""
    places = [app.folder, app.data_dir]
    return [p for place in places for p in place.rglob("*") if p.is_file() and p.read_bytes() == data]


def test_not_stored_means_gone_seconds_after_the_prediction(app):
    from ui.upload_store import READ_GRACE_S

    image, unused_image = unique_png("9"), unique_png("8")
    with client_at(app, 40) as c:
        session = uuid.uuid4().hex
        assert join(c, fn_index(c, "predict"), [ref(upload(c, image))], session).status_code == 200
        assert label_of(outcome(c, session)) == "9"
        answered = time.perf_counter()
        assert copies(app, image)  # (the check below can see the upload)
        wait_for(lambda: not copies(app, image), timeout=READ_GRACE_S + 10, what="the upload to be deleted")
        kept_s = time.perf_counter() - answered
        unused = time.perf_counter()
        upload(c, unused_image)
        wait_for(lambda: not copies(app, unused_image), timeout=TTL_S + 10, what="the unused upload to be deleted")
        unused_s = time.perf_counter() - unused
    print(f"upload deleted {kept_s:.1f} s after its prediction, an unused one after {unused_s:.1f} s")
    assert kept_s <= READ_GRACE_S + 3 and unused_s <= TTL_S + 3


# --- Medium 8: CORS and headers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def reviewer(app):
    with httpx.Client(base_url=app.url, timeout=10) as c:
        r = c.post("/review/login", data={"username": "alice", "password": PASSWORD})
        assert r.status_code == 200, r.text
        assert c.get("/review/config").status_code == 200
        yield c


def test_no_other_origin_may_read_anything(app):
    foreign = {"Origin": "https://evil.example", "Host": "loupe.example.com"}
    with reviewer(app) as c, client_at(app, 50) as anon:
        answers = [c.get("/review/config", headers=foreign), c.get("/config", headers=foreign),
                   anon.get("/gradio_api/info", headers=foreign), anon.get("/api/v1/model", headers=foreign),
                   anon.post("/gradio_api/queue/join", headers=foreign,
                             json={"data": [None], "fn_index": 0, "session_hash": "x"}),
                   anon.options("/review/gradio_api/queue/join", headers={
                       **foreign, "Access-Control-Request-Method": "POST",
                       "Access-Control-Request-Headers": "content-type"})]
    for r in answers:
        leaked = {k: v for k, v in r.headers.items() if k.startswith("access-control-allow")}
        assert leaked == {}, (r.request.url, leaked)


def check_headers(r: httpx.Response, *, space: bool = False) -> None:
    csp = r.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "object-src 'none'" in csp, (r.request.url, csp)
    if space:
        assert "frame-ancestors https://huggingface.co" in csp and "x-frame-options" not in r.headers
    else:
        assert "frame-ancestors 'none'" in csp and r.headers.get("x-frame-options") == "DENY", r.request.url
    assert r.headers.get("x-content-type-options") == "nosniff", r.request.url
    assert r.headers.get("referrer-policy") == "no-referrer", r.request.url


def test_security_headers_on_every_kind_of_response(app):
    with client_at(app, 60) as c:
        page = c.get("/")
        asset = re.search(r'(/assets/[^"\']+\.js)', page.text).group(1)
        example = fn_index(c, "load_example")
        answers = [page, c.get("/review/"), c.get("/config"), c.get("/review/config"), c.get("/healthz"),
                   c.get("/api/v1/model"), c.get("/api/docs"), c.get(asset), c.get("/no-such-page"),
                   c.get("/gradio_api/deep_link"), c.post("/gradio_api/upload", content=b"x"),
                   c.post("/gradio_api/upload", files={"files": ("d.png", examples()["1"].read_bytes())}),
                   c.post("/gradio_api/run/predict", json={"data": [1], "fn_index": example, "session_hash": "h"}),
                   c.post("/api/v1/predict", files={"file": ("d.png", examples()["1"].read_bytes())})]
        file_url = answers[-2].json()["data"][0]["value"]["url"]
        answers.append(c.get(file_url))
    assert {r.status_code for r in answers} >= {200, 401, 404, 415}
    for r in answers:
        check_headers(r)


@pytest.fixture
def space_server(tmp_path, demo_predictor):
    """Loupe as a Space runs it (SPACE_ID set), in this process on a free port."""
    from tests.app_support import app_parts, serving

    settings = Settings(data_dir=tmp_path / "data", space_id="someone/loupe", gradio_temp_dir=tmp_path / "g")
    service = app_parts(settings, demo_predictor)
    with serving(settings, service) as url:
        yield url
    service.store.close()


def test_on_a_space_only_huggingface_may_frame_the_app(space_server):
    with httpx.Client(base_url=space_server, timeout=10) as c:
        for r in (c.get("/"), c.get("/config"), c.get("/healthz")):
            check_headers(r, space=True)
        r = c.post("/gradio_api/upload", files={"files": ("d.png", examples()["1"].read_bytes())})
        assert r.status_code == 200
        # huggingface.co frames the app: the client cookie must work in a third-party context
        assert re.search(r"loupe_client=[^;]+; Path=/; HttpOnly; SameSite=None; Secure; Partitioned",
                         r.headers["set-cookie"])


# --- Low: no server paths in any answer ---------------------------------------------------------------------------


def test_no_answer_names_a_server_folder(app):
    folders = {str(app.folder), str(app.folder.parent), str(app.data_dir.resolve()), str(REPO)}
    texts = {}
    with reviewer(app) as c:
        for route in ("/", "/config", "/gradio_api/info", "/review/", "/review/config", "/review/gradio_api/info"):
            texts[route] = c.get(route).text
        texts["upload"] = c.post("/gradio_api/upload", files={"files": ("d.png", examples()["2"].read_bytes())}).text
        texts["example"] = c.post("/gradio_api/run/predict", json={"data": [3], "fn_index": fn_index(c, "load_example"),
                                                                  "session_hash": "h"}).text
        session = uuid.uuid4().hex
        join(c, fn_index(c, "predict"), [ref(upload(c, examples()["2"].read_bytes()))], session)
        texts["event stream"] = str(outcome(c, session))
        texts["prediction"] = str(predict(c, ref(texts["upload"][2:-2]), fn_index(c, "predict")))
    assert "gradio-files/" in texts["/config"] and "gradio-files/uploads/" in texts["upload"]
    for name, text in texts.items():
        assert not [f for f in folders if f in text], name
