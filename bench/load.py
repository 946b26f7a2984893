"""Load generators for bench/concurrency.py: closed-loop client threads, simultaneous bursts, distinct images."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
from PIL import Image

from bench.common import jpeg_bytes, sample_image


class Images:
    """A thread-safe supply of distinct JPEGs (one changed pixel row each), generated up front."""

    def __init__(self, n: int):
        arr = np.asarray(sample_image("resnet18")).copy()
        self._jpgs = []
        for i in range(n):
            arr[0, :32] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
            arr[1, :32] = (i * 37) % 256
            self._jpgs.append(jpeg_bytes(Image.fromarray(arr, "RGB")))
        self._i = 0
        self._lock = threading.Lock()

    def next(self) -> bytes:
        with self._lock:
            self._i += 1
            return self._jpgs[self._i % len(self._jpgs)]


def closed_loop(call, clients: int, seconds: float) -> tuple[int, list[str], list[float]]:
    """`clients` threads each sending requests back to back until the deadline -> (ok, errors, latencies ms)."""
    import httpx

    ok, errors, lat = [0], [], []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker():
        with httpx.Client(timeout=120) as c:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    good, msg = call(c)
                except httpx.HTTPError as e:
                    good, msg = False, f"{type(e).__name__}: {e}"
                with lock:
                    if good:
                        ok[0] += 1
                        lat.append((time.perf_counter() - t) * 1000)
                    else:
                        errors.append(msg[:160])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ok[0], errors, lat


def multipart_request(port: int, jpg: bytes) -> bytes:
    """A complete HTTP/1.1 POST /api/v1/predict, built once: the burst's clients then cost almost no CPU,
    so the time to "busy" measures the server, not 64 Python threads encoding multipart bodies."""
    boundary = "loupebenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpg + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def raw_burst(port: int, requests: list[bytes]) -> list[tuple[str, float]]:
    """One thread per pre-built request, connected first, all sent at the same instant -> [(outcome, ms)]."""
    barrier = threading.Barrier(len(requests))
    out: list[tuple[str, float]] = []
    lock = threading.Lock()

    def worker(req: bytes):
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            barrier.wait()
            t = time.perf_counter()
            sock.sendall(req)
            status = sock.recv(64).split(b" ", 2)[1]  # "HTTP/1.1 503 ..." (the status line comes first)
            ms = (time.perf_counter() - t) * 1000
            while sock.recv(65536):  # Connection: close; drain
                pass
        with lock:
            out.append(({b"200": "ok", b"503": "busy"}.get(status, f"HTTP {status.decode()}"), ms))

    threads = [threading.Thread(target=worker, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def burst(call, base: str, clients: int) -> list[tuple[str, float]]:
    """`clients` httpx threads released together, one request each -> [(outcome, ms)]."""
    import httpx

    barrier = threading.Barrier(clients)
    out: list[tuple[str, float]] = []
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=120) as c:
            c.get(base + "/healthz")  # connect before the barrier: we measure the server, not TCP set-up
            barrier.wait()
            t = time.perf_counter()
            try:
                outcome = call(c)
            except httpx.HTTPError as e:
                outcome = f"error {type(e).__name__}"
            with lock:
                out.append((outcome, (time.perf_counter() - t) * 1000))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
