"""Image storage and a broken data directory (issue 6: Medium 5 and the Low "looks healthy" item), end to end
against a real ``python app.py`` on the demo model.

- An 8 MB photo was stored as a 58-97 MB PNG of its full pixels: now it is shrunk to LOUPE_STORE_MAX_SIDE and
  kept as a metadata-free JPEG; drawings stay lossless PNG.
- A cap on the store and a minimum of free disk: over either, predictions are still logged without their
  images, with ONE log line and a degraded /healthz.
- An unwritable images/ directory answered predictions with nothing written and /healthz "ok": now the
  predictions are logged without images and /healthz says why; a read-only data directory at start exits
  with code 2 and a message, not a traceback.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.imageio import decode_image
from tests.big_images import photo_jpeg
from tests.browser_support import REPO, start_app, wait_for

MB = 1 << 20


def examples() -> dict[str, bytes]:
    from model.demo import DEMO_EXAMPLES_DIR

    return {p.stem.removeprefix("digit_"): p.read_bytes() for p in sorted(Path(DEMO_EXAMPLES_DIR).glob("*.png"))}


def drawing(seed: int) -> bytes:
    """A distinct small PNG per seed (a digit with one pixel changed): distinct images, distinct files."""
    img = Image.open(io.BytesIO(examples()[str(seed % 10)])).convert("RGB")
    img.putpixel((0, 0), (seed % 256, 7, 9))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def drop_root_overrides() -> list[str]:
    """Run the app so that file permissions apply to it: as root, without CAP_DAC_OVERRIDE."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file permissions would not apply to the app")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture
def data_dir(tmp_path, demo_settings, demo_predictor):
    data = tmp_path / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")  # converted bundle: start-up is just imports
    return data


def post(app, data: bytes, name: str = "x.png") -> str:
    r = httpx.post(app.url + "/api/v1/predict", files={"file": (name, data)}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["prediction_id"]


def logged(app, pid: str, *, timeout: float = 30) -> tuple[str | None]:
    """The prediction's row (image_sha256,) once the background writer has written it."""

    def row():
        with sqlite3.connect(app.data_dir / "loupe.db") as db:
            return db.execute("SELECT image_sha256 FROM predictions WHERE id = ?", (pid,)).fetchone()

    return wait_for(row, timeout=timeout, what=f"prediction {pid} in the database")


def stored_files(app) -> list[Path]:
    return sorted(p for p in (app.data_dir / "images").rglob("*") if p.is_file())


def health(app) -> dict:
    r = httpx.get(app.url + "/healthz", timeout=10)
    assert r.status_code == 200  # degraded is still serving: Docker must not restart it over a full disk
    return r.json()


def test_a_big_photo_is_stored_shrunk_as_a_metadata_free_jpeg_and_a_drawing_stays_lossless(data_dir):
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x8825] = {1: "N", 2: (52.0, 22.0, 1.5)}  # GPS latitude
    photo = photo_jpeg(6000, 6600, exif=exif)
    assert 7 * MB < len(photo) <= 10 * MB
    app = start_app(data_dir)
    try:
        (sha,) = logged(app, post(app, photo, "photo.jpg"))
        path = app.data_dir / "images" / sha[:2] / f"{sha}.jpg"
        stored = path.read_bytes()
        print(f"{len(photo) / MB:.1f} MB JPEG stored as {len(stored) / MB:.2f} MB")
        assert len(stored) < len(photo) / 10  # before: a PNG of all 40 megapixels, 7x the upload
        with Image.open(io.BytesIO(stored)) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert max(img.size) == 1024 and img.size[1] / img.size[0] == pytest.approx(6600 / 6000, abs=0.01)
            assert len(img.getexif()) == 0 and not {"exif", "icc_profile", "comment"} & set(img.info)
        assert b"PhoneMaker" not in stored
        # deterministic: the same upload again is the same file (the store is content-addressed)
        assert logged(app, post(app, photo, "again.jpg")) == (sha,)
        assert [p.name for p in stored_files(app)] == [path.name]

        digit = examples()["3"]
        (sha3,) = logged(app, post(app, digit))
        with Image.open(app.data_dir / "images" / sha3[:2] / f"{sha3}.png") as img:
            assert img.format == "PNG"
            decoded = decode_image(digit, max_bytes=10 * MB, max_pixels=10**7)
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(decoded))  # lossless
        assert {k: v for k, v in health(app).items() if k not in ("model", "drift")} == {"status": "ok"}
    finally:
        assert app.stop() == 0, app.log()


@pytest.mark.parametrize("env,first_stored,why", [
    ({"LOUPE_MAX_STORAGE_GB": "1e-7"}, 1, "its cap (LOUPE_MAX_STORAGE_GB)"),  # ~100 bytes: one drawing fills it
    ({"LOUPE_MIN_FREE_DISK_GB": "1000000"}, 0, "below LOUPE_MIN_FREE_DISK_GB"),
], ids=["store-cap", "free-disk"])
def test_a_full_store_logs_predictions_without_images_says_so_once_and_degrades_health(data_dir, env, first_stored,
                                                                                       why):
    app = start_app(data_dir, env)
    try:
        rows = [logged(app, post(app, drawing(i))) for i in range(5)]
        assert len(rows) == 5  # every prediction is logged...
        assert sum(sha is not None for (sha,) in rows) == first_stored  # ...without its image once full
        assert len(stored_files(app)) == first_stored
        h = health(app)
        assert h["status"] == "degraded", h
        assert any("image storage full" in p and why in p for p in h["problems"]), h
        assert app.log().count("image storage full") == 1, app.log()  # one line, not one per request
    finally:
        assert app.stop() == 0, app.log()


def test_an_unwritable_images_dir_degrades_health_and_predictions_are_still_logged(data_dir):
    app = start_app(data_dir, prefix=drop_root_overrides())
    images = app.data_dir / "images"
    try:
        assert logged(app, post(app, drawing(0)))[0] is not None and health(app)["status"] == "ok"
        for d in [images, *images.iterdir()]:
            d.chmod(0o555)
        rows = [logged(app, post(app, drawing(i))) for i in range(1, 4)]
        assert rows == [(None,)] * 3  # answered AND logged, without the image that could not be written
        h = health(app)
        assert h["status"] == "degraded" and any("images cannot be written" in p for p in h["problems"]), h
        assert app.log().count("cannot write images") == 1, app.log()
        for d in [images, *images.iterdir()]:
            d.chmod(0o755)
        assert logged(app, post(app, drawing(4)))[0] is not None  # fixed: images are stored again...
        assert health(app)["status"] == "ok"  # ...and health says so
    finally:
        for d in [images, *images.iterdir()]:
            d.chmod(0o755)
        assert app.stop() == 0, app.log()


@pytest.mark.parametrize("read_only", ["data", "images"])
def test_a_read_only_data_dir_stops_the_app_at_start_with_a_clear_message(tmp_path, read_only):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" if read_only == "images" else data).chmod(0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOUPE_", "GRADIO_"))}
    env.update(LOUPE_DATA_DIR=str(data), GRADIO_ANALYTICS_ENABLED="False")
    try:
        proc = subprocess.run([*drop_root_overrides(), sys.executable, str(REPO / "app.py")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        for d in (data, data / "images"):
            d.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert "not writable" in proc.stderr and str(data) in proc.stderr and "LOUPE_DATA_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
