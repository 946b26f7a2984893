"""Memory stays bounded under a flood of large valid images (issue 6, High 4), against a real ``python app.py``.

Before the fix the prediction log's queue held each request's decoded pixels (36 MB for a 12-megapixel photo) for
up to 256 records: clients posting big JPEGs faster than the writer could PNG-encode them grew the server by
hundreds of MB per second. Now a queued record holds the upload's encoded bytes, the queue is bounded in bytes
(LOUPE_LOG_QUEUE_MB), and the writer decodes one image at a time. The bound below is derived from the settings the
app runs with; the server's RSS (/proc/<pid>/status VmRSS) is sampled while several clients flood it.
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from tests.big_images import photo_jpeg
from tests.browser_support import start_app

MB = 1 << 20
SETTINGS = {
    "LOUPE_MAX_UPLOAD_MB": "4",
    "LOUPE_MAX_PIXELS": "12000000",
    "LOUPE_LOG_QUEUE_MB": "16",
    "LOUPE_MODEL_WORKERS": "2",
    "LOUPE_QUEUE_MAX_SIZE": "4",
}
CLIENTS = 4
# Flood until this many big images were answered (the old code kept each one's 36 MB of pixels queued: ~1.4 GB),
# or for at most FLOOD_S seconds on a slow machine.
PREDICTIONS = 40
FLOOD_S = 60.0
# The interpreter's own growth under load, the codecs' buffers, allocator slack: measured at ~100 MB here.
SLACK_MB = 200


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def bound_mb(baseline: float) -> float:
    """Everything the settings allow the server to hold at once, on top of its warmed-up size."""
    upload = float(SETTINGS["LOUPE_MAX_UPLOAD_MB"])
    decoded = int(SETTINGS["LOUPE_MAX_PIXELS"]) * 3 / MB
    workers, waiting = int(SETTINGS["LOUPE_MODEL_WORKERS"]), int(SETTINGS["LOUPE_QUEUE_MAX_SIZE"])
    log_queue = float(SETTINGS["LOUPE_LOG_QUEUE_MB"]) + upload  # one upload may exceed the byte budget alone
    bodies = (workers + waiting) * upload * 2  # admitted requests: the multipart copy and the bytes read from it
    running = workers * 3 * decoded  # decoded RGB, its copy in to_rgb, the model's preprocessing
    writer = 2 * decoded  # the writer's one decode (JPEG: reduced) and its downscaled copy
    return baseline + log_queue + bodies + running + writer + SLACK_MB


@pytest.mark.slow
def test_rss_stays_bounded_under_a_flood_of_big_jpegs(tmp_path, demo_settings, demo_predictor):
    # 4000 x 3000 = the pixel cap; distinct bytes per client so the image store keeps every one
    images = [photo_jpeg(4000, 3000, seed=i) for i in range(CLIENTS)]
    assert all(2 * MB < len(d) <= 4 * MB for d in images), [len(d) for d in images]
    data = tmp_path / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")  # converted bundle: start-up is just imports
    app = start_app(data, SETTINGS)
    try:
        pid = app.proc.pid
        with httpx.Client(base_url=app.url, timeout=120) as client:
            for d in images:  # warm-up: imports, model, allocator, one big decode per worker
                r = client.post("/api/v1/predict", files={"file": ("warm.jpg", d, "image/jpeg")})
                assert r.status_code == 200, r.text
        baseline = rss_mb(pid)
        bound = bound_mb(baseline)
        peak = [baseline]
        stop = threading.Event()
        outcomes: list[int] = []

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(pid))
                if peak[0] > bound:
                    stop.set()  # the verdict is in; do not push the machine further
                stop.wait(0.05)

        def flood(data: bytes) -> None:
            with httpx.Client(base_url=app.url, timeout=120) as c:
                while not stop.is_set():
                    r = c.post("/api/v1/predict", files={"file": ("big.jpg", data, "image/jpeg")})
                    outcomes.append(r.status_code)

        threads = [threading.Thread(target=sample)] + [threading.Thread(target=flood, args=(d,)) for d in images]
        for t in threads:
            t.start()
        deadline = time.monotonic() + FLOOD_S
        while not stop.is_set() and outcomes.count(200) < PREDICTIONS and time.monotonic() < deadline:
            stop.wait(0.1)
        stop.set()
        for t in threads:
            t.join(150)
        ok = outcomes.count(200)
        print(f"RSS baseline {baseline:.0f} MB, peak {peak[0]:.0f} MB, bound {bound:.0f} MB; "
              f"{ok} predictions, {outcomes.count(503)} busy")
        assert set(outcomes) <= {200, 503}, outcomes
        assert peak[0] <= bound, f"RSS reached {peak[0]:.0f} MB, over the {bound:.0f} MB the settings allow"
        assert ok >= 2 * CLIENTS, "too few big images went through to prove anything"
        with httpx.Client(base_url=app.url, timeout=30) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        assert app.stop() == 0, app.log()
