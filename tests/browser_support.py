"""Shared helpers for real-browser tests: start the app as a subprocess, fake-webcam clips, Chromium launch.

Generic on purpose (the Predict and Review browser tests both use it). Recipe and selectors:
/work/shared/notes/browser-testing.md. Nothing here touches the network beyond 127.0.0.1.

Launch browsers from pytest-playwright's session-scoped ``playwright`` fixture, e.g. in a module fixture
``browser = playwright.chromium.launch(**launch_args(clip))``: a second ``sync_playwright()`` in the same
process would clash with it ("Sync API inside the asyncio loop").
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

RESULTS = Path(__file__).resolve().parents[1] / "test-results"  # screenshots, traces (git-ignored)
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying the (closed) network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(fake_video: Path | None = None) -> dict:
    """``browser_type.launch(**launch_args(...))`` for Debian's Chromium, optionally with a fake camera."""
    args = list(CHROMIUM_ARGS)
    if fake_video is not None:
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={fake_video}"]
    return {"executable_path": str(CHROMIUM), "headless": True, "args": args}


@dataclass
class AppProcess:
    """A running ``python app.py`` on 127.0.0.1; ``stop()`` ends exactly this process."""

    url: str
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path
    env: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        """SIGINT (a clean shutdown: the app flushes its logs) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_app(data_dir: Path, env: Mapping[str, str] | None = None, *, timeout: float = 120,
              args: Iterable[str] = (), prefix: Iterable[str] = ()) -> AppProcess:
    """Start the app with a temporary data dir and ``LOUPE_*`` settings; wait until /healthz answers.

    ``prefix``: a command the app runs under (e.g. ``setpriv`` dropping root's permission overrides)."""
    port = free_port()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOUPE_", "GRADIO_"))}
    full_env.update({"LOUPE_HOST": "127.0.0.1", "LOUPE_PORT": str(port), "LOUPE_DATA_DIR": str(data_dir),
                     "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    log_path = data_dir.parent / f"{data_dir.name}-app.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*prefix, sys.executable, str(REPO / "app.py"), *args], cwd=REPO, env=full_env,
                                stdout=log, stderr=subprocess.STDOUT)
    app = AppProcess(f"http://127.0.0.1:{port}", data_dir, proc, log_path, full_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with code {proc.returncode}:\n{app.log()}")
        try:
            if httpx.get(app.url + "/healthz", timeout=2).status_code == 200:
                return app
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.25)
    app.stop()
    raise RuntimeError(f"app not ready after {timeout} s:\n{app.log()}")


def write_y4m(path: Path, frames: list[Image.Image], *, fps: int = 10, repeat: int = 1) -> Path:
    """Write a Y4M (YUV 4:2:0) clip Chromium can play as a fake camera; it loops the clip.

    All frames must share one size with even width and height. ``repeat`` writes each frame that many
    times (a slow slideshow at ``fps``).
    """
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError("Y4M 4:2:0 needs even width and height")
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            if frame.size != (width, height):
                raise ValueError("all frames must have the same size")
            y, u, v = frame.convert("YCbCr").split()
            half = (width // 2, height // 2)
            planes = y.tobytes() + u.resize(half, Image.BOX).tobytes() + v.resize(half, Image.BOX).tobytes()
            for _ in range(repeat):
                f.write(b"FRAME\n" + planes)
    return Path(path)


def camera_roundtrip(frame: Image.Image, quality: int = 80) -> Image.Image:
    """Roughly what the server receives for ``frame`` shown by the fake camera: YUV 4:2:0 chroma, then JPEG
    (live frames are JPEG data URLs). For checking a clip's content is recognisable before relying on it."""
    y, u, v = frame.convert("YCbCr").split()
    half = (frame.width // 2, frame.height // 2)
    u, v = (c.resize(half, Image.BOX).resize(frame.size, Image.BILINEAR) for c in (u, v))
    buf = io.BytesIO()
    Image.merge("YCbCr", (y, u, v)).convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def frame_with(image: Image.Image, size: tuple[int, int] = (320, 240), background: str = "white") -> Image.Image:
    """``image`` scaled to fit ``size`` (aspect kept) and centred on a plain background: one camera frame."""
    frame = Image.new("RGB", size, background)
    img = image.convert("RGB")
    scale = min(size[0] / img.width, size[1] / img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    frame.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return frame


def wait_for(check: Callable[[], object], timeout: float = 30, what: str = "condition"):
    """Poll ``check`` until it returns something truthy (e.g. rows the app writes in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


SETTLED_JS = """(selector) => { let e = document.querySelector(selector);
  if (!e) return false;
  for (; e; e = e.parentElement) { const s = getComputedStyle(e);
    if (s.opacity !== '1' || (s.transform !== 'none' && s.transform !== 'matrix(1, 0, 0, 1, 0, 0)')) return false; }
  return true; }"""


def wait_until_settled(page, selector: str, timeout: float = 10_000) -> None:
    """Wait until ``selector`` has finished flying/fading in (Gradio's toasts animate in from JavaScript, which
    Playwright's ``animations="disabled"`` does not stop): a screenshot then shows it."""
    page.wait_for_function(SETTLED_JS, arg=selector, timeout=timeout)
