"""Issue 6, medium 7: clients that send headers and then no body must not hold REST admission.

End to end against a real ``python app.py`` (real uvicorn, real sockets): idle and trickling bodies are cut
off with 408 after the body deadline, honest predicts succeed meanwhile, the reading allowance is bounded.
Plus the middleware's budget rules on a fake ASGI channel (fast, exact).
"""

from __future__ import annotations

import select
import shutil
import socket
import statistics
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest

from ui.body_timeout import BodyTimeout, BodyTimeoutMiddleware

DIGIT = Path(__file__).resolve().parents[1] / "model/demo_artifacts/examples/digit_3.png"
TIMEOUT_S = 4.0  # LOUPE_BODY_TIMEOUT_S for the app under test
MIN_RATE = 500  # LOUPE_BODY_MIN_RATE (bytes/s)
MAX_READING = 24  # LOUPE_REST_MAX_READING
IDLE_PREDICT = 20  # more than the default run + wait slots (2 + 16 on this box) that idle clients held before
IDLE_UPLOAD = 2


def multipart(data: bytes, field: str = "file", name: str = "3.png") -> tuple[bytes, str]:
    boundary = "loupe-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def open_body(port: int, path: str, length: int, first: bytes = b"") -> socket.socket:
    """A POST whose headers promise ``length`` bytes of multipart body; sends only ``first`` of it."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
              f"Content-Length: {length}\r\n\r\n".encode() + first)
    return s


def still_open(s: socket.socket) -> bool:
    """True when the server has neither answered nor closed this connection yet."""
    try:
        s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False  # an answer, or b"" for a closed connection


def answer_and_close(s: socket.socket, since: float, limit: float) -> tuple[str, float]:
    """(status line, seconds from ``since`` until the server closed the connection)."""
    s.settimeout(limit)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        return "still open", limit
    return data.split(b"\r\n", 1)[0].decode(errors="replace"), time.monotonic() - since


def honest(client: httpx.Client, url: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = client.post(url + "/api/v1/predict", files={"file": ("3.png", DIGIT.read_bytes(), "image/png")})
    return r.status_code, time.perf_counter() - t0


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_settings, demo_predictor):
    from tests.browser_support import start_app

    data = tmp_path_factory.mktemp("idle") / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")  # the converted bundle: start-up costs imports only
    app = start_app(data, {"LOUPE_BODY_TIMEOUT_S": str(TIMEOUT_S), "LOUPE_BODY_MIN_RATE": str(MIN_RATE),
                           "LOUPE_REST_MAX_READING": str(MAX_READING)})
    yield app
    assert app.stop() == 0, app.log()


def test_idle_bodies_neither_hold_admission_nor_stay_open(app):
    port = int(app.url.rsplit(":", 1)[1])
    with httpx.Client(timeout=30) as client:
        quiet = [honest(client, app.url) for _ in range(5)]
        assert {code for code, _ in quiet} == {200}
        quiet_p50 = statistics.median(t for _, t in quiet)

        opened = time.monotonic()
        idle = [open_body(port, "/api/v1/predict", 5000) for _ in range(IDLE_PREDICT)]
        idle += [open_body(port, "/gradio_api/upload", 5000) for _ in range(IDLE_UPLOAD)]
        trickler = open_body(port, "/api/v1/predict", 5000, b"--x\r\n")
        trickled: list[tuple[str, float]] = []

        def trickle():  # 4 bytes/s, far below MIN_RATE: must be cut about when the idle ones are
            try:
                while not select.select([trickler], [], [], 0.25)[0]:
                    trickler.sendall(b"a")
            except (OSError, ValueError):
                return  # closed by the test
            trickled.append(answer_and_close(trickler, opened, 5))  # stops sending once the server answers

        trickling = threading.Thread(target=trickle, daemon=True)
        trickling.start()
        extra: list[socket.socket] = []
        try:
            # Round trips on a fresh connection let the server's event loop take in the idle requests first
            # (their headers were sent earlier); otherwise a predict could slip in ahead of them.
            for _ in range(3):
                assert httpx.get(app.url + "/healthz").status_code == 200
            busy = [honest(client, app.url) for _ in range(5)]
            assert [code for code, _ in busy] == [200] * 5, busy
            # ... while every idle connection was still open and unanswered (none was turned away either).
            assert all(still_open(s) for s in [*idle, trickler]), "an idle connection was answered or dropped early"
            busy_p50 = statistics.median(t for _, t in busy)
            assert busy_p50 < 5 * quiet_p50 + 0.5, (quiet_p50, busy_p50)

            # The reading allowance is bounded: fill it, and the next predict is told "busy" at once.
            extra += [open_body(port, "/api/v1/predict", 5000) for _ in range(MAX_READING - IDLE_PREDICT - 1)]
            code, took = wait_for_busy(client, app.url)
            assert code == 503 and took < 1.0, (code, took)

            outcomes = [answer_and_close(s, opened, TIMEOUT_S + 10) for s in idle]
            extra_outcomes = [answer_and_close(s, opened, TIMEOUT_S + 10) for s in extra]
            trickling.join(TIMEOUT_S + 10)
            outcomes += trickled
        finally:
            for s in [*idle, trickler, *extra]:
                s.close()
        assert {status for status, _ in outcomes + extra_outcomes} == {"HTTP/1.1 408 Request Timeout"}, outcomes
        closed_after = [t for _, t in outcomes]
        assert TIMEOUT_S - 0.5 < min(closed_after) and max(closed_after) < TIMEOUT_S + 5, closed_after
        assert honest(client, app.url)[0] == 200  # reading slots are all back
    assert "request body timed out: POST /gradio_api/upload" in app.log()
    assert "Traceback" not in app.log()


def wait_for_busy(client: httpx.Client, url: str) -> tuple[int, float]:
    """The last idle connection's reading slot is taken when the server has read its headers: poll briefly."""
    deadline = time.monotonic() + 2
    while True:
        code, took = honest(client, url)
        if code == 503 or time.monotonic() > deadline:
            return code, took


def test_slow_but_steady_upload_is_not_cut_off(app):
    """An honest client sending at twice the minimum rate takes longer than the initial grace and still gets
    its answer: each byte received extends the budget."""
    body, ctype = multipart(DIGIT.read_bytes())
    port = int(app.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.monotonic()
    s.sendall(f"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    step = MIN_RATE // 5  # 2 x MIN_RATE bytes per second
    for i in range(0, len(body), step):
        s.sendall(body[i:i + step])
        time.sleep(0.1)
    status, _ = answer_and_close(s, t0, 30)
    s.close()
    assert time.monotonic() - t0 > TIMEOUT_S  # the slow path really was slower than the grace alone
    assert status == "HTTP/1.1 200 OK"


# --- the middleware's budget on a fake ASGI channel ------------------------------------------------------------


class Channel:
    """The server side of one request: body chunks arrive at the given delays; then a disconnect after ``tail``."""

    def __init__(self, chunks: list[tuple[float, bytes]], tail: float = 0.0):
        self.chunks = list(chunks)
        self.tail = tail
        self.sent: list[dict] = []

    async def receive(self):
        if self.chunks:
            delay, data = self.chunks.pop(0)
            await anyio.sleep(delay)
            return {"type": "http.request", "body": data, "more_body": bool(self.chunks)}
        await anyio.sleep(self.tail)
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)

    def status(self):
        starts = [m["status"] for m in self.sent if m["type"] == "http.response.start"]
        return starts[0] if starts else None


SCOPE = {"type": "http", "method": "POST", "path": "/x", "client": ("127.0.0.1", 1)}


def run(channel: Channel, app, timeout_s: float, min_rate: float = 1000):
    """Run the middleware on its own event loop, in a thread of its own: pytest-playwright's session keeps an
    event loop running in the main thread once a browser test has run, and anyio.run refuses to nest in it."""
    from concurrent.futures import ThreadPoolExecutor

    middleware = BodyTimeoutMiddleware(app, timeout_s=timeout_s, min_rate=min_rate)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, middleware, SCOPE, channel.receive, channel.send).result()


async def read_body_then_answer(scope, receive, send, seen=None):
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    if seen is not None:
        seen.append(await receive())  # like a streaming response waiting for the client to leave
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def test_idle_body_gets_408_and_the_app_sees_the_timeout():
    seen = []

    async def app(scope, receive, send):
        try:
            await receive()
        except BodyTimeout as e:
            seen.append(e)
            raise

    ch = Channel([(5.0, b"late")])
    t0 = time.monotonic()
    run(ch, app, timeout_s=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    assert ch.status() == 408 and (b"connection", b"close") in ch.sent[0]["headers"] and seen


def test_app_answer_after_the_timeout_is_dropped():
    async def app(scope, receive, send):
        try:
            await receive()
        except BodyTimeout:
            await send({"type": "http.response.start", "status": 400, "headers": []})  # e.g. FastAPI's wrapping

    ch = Channel([(5.0, b"late")])
    run(ch, app, timeout_s=0.1)
    assert [m.get("status") for m in ch.sent if m["type"] == "http.response.start"] == [408]


def test_steady_body_longer_than_the_grace_completes_and_a_trickle_does_not():
    steady = Channel([(0.05, b"x" * 100)] * 10)  # 2000 B/s for 0.5 s; grace 0.2 s, min rate 1000 B/s
    run(steady, read_body_then_answer, timeout_s=0.2)
    assert steady.status() == 200 and steady.sent[1]["body"] == b"x" * 1000
    trickle = Channel([(0.05, b"x")] * 20)  # 20 B/s
    run(trickle, read_body_then_answer, timeout_s=0.2)
    assert trickle.status() == 408


def test_a_burst_then_silence_is_cut_after_the_grace_not_after_what_it_earned():
    # 1 MB at once would earn 1000 s at 1000 B/s; a stall after it still ends after 0.2 s.
    ch = Channel([(0.0, b"x" * 1_000_000), (5.0, b"late")])
    t0 = time.monotonic()
    run(ch, read_body_then_answer, timeout_s=0.2)
    assert ch.status() == 408 and time.monotonic() - t0 < 2


def test_only_time_waiting_for_the_client_counts_and_nothing_after_the_body():
    async def slow_app(scope, receive, send):
        await anyio.sleep(0.3)  # the server is busy before it reads: not the client's fault
        await read_body_then_answer(scope, receive, send, seen)

    seen = []
    ch = Channel([(0.0, b"body")], tail=0.4)  # an event stream waits for the disconnect longer than the budget
    run(ch, slow_app, timeout_s=0.1)
    assert ch.status() == 200 and seen == [{"type": "http.disconnect"}]


def test_other_app_errors_still_propagate():
    async def broken(scope, receive, send):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        run(Channel([(0.0, b"")]), broken, timeout_s=1)
