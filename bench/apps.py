"""Processes under test for the benchmarks: start an app on a free loopback port, wait for /healthz, read its
peak RSS, stop it (only the processes we started); and the two client protocols (REST, Gradio's HTTP API)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import ROOT


# ---- subprocesses ------------------------------------------------------------------------------------
def bench_env(**extra: str) -> dict[str, str]:
    """The environment for an app under test: no inherited LOUPE_/GRADIO_ settings, loopback only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOUPE_", "GRADIO_"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT),
               LOUPE_HOST="127.0.0.1", GRADIO_SERVER_NAME="127.0.0.1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """High-water mark of a running process's resident set (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary directory for data dirs and app logs: removed after a clean run (concurrency runs store
    thousands of images), kept and named when something failed, so its logs can be read."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    except BaseException:
        print(f"[bench] kept {tmp} (app logs, data dirs) for inspection")
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a running process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def run_measured(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of a command run to completion: ru_maxrss of exactly that child, via wait4."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        t = time.perf_counter()
        pid = os.posix_spawnp(argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1),
                                                                   (os.POSIX_SPAWN_DUP2, devnull, 2)])
    finally:
        os.close(devnull)
    deadline = t + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            os.kill(pid, 9)
            os.wait4(pid, 0)
            raise TimeoutError(f"{argv} still running after {timeout:.0f} s")
        time.sleep(0.01)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} exited with {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


class App:
    """A server process we started: wait until GET <health> answers 200, read its peak RSS, stop it."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path, health: str = "/healthz"):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        self._health = health
        self._logf = open(log, "wb")  # closed in stop()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._logf, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds from process start to the first 200 from the health URL."""
        import httpx

        deadline = self.t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + self._health, timeout=1.0).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
        raise TimeoutError(f"app not ready after {timeout:.0f} s:\n{self.tail()}")

    def rss_peak(self) -> float:
        return peak_rss_mib(self.proc.pid)

    def tail(self, n: int = 3000) -> str:
        if not self._logf.closed:
            self._logf.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- clients -----------------------------------------------------------------------------------------
def rest_predict(client, base: str, jpg: bytes) -> tuple[int, str]:
    """POST /api/v1/predict (multipart field ``file``) -> (status, body)."""
    r = client.post(f"{base}/api/v1/predict", files={"file": ("image.jpg", jpg, "image/jpeg")})
    return r.status_code, r.text


def gradio_predict(client, base: str, jpg: bytes, api: str = "predict") -> tuple[bool, str]:
    """Gradio's own HTTP protocol, as a browser or curl user does it: upload, call, read the event stream.

    (gradio_client adds ~200 ms of client-side work per call on this machine; this measures the server.)
    Returns (completed, data of the final event)."""
    r = client.post(f"{base}/gradio_api/upload", files={"files": ("image.jpg", jpg, "image/jpeg")})
    if r.status_code != 200:
        return False, f"upload: HTTP {r.status_code} {r.text[:200]}"
    payload = {"data": [{"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}]}
    r = client.post(f"{base}/gradio_api/call/{api}", json=payload)
    if r.status_code != 200:
        return False, f"call: HTTP {r.status_code} {r.text[:200]}"
    event = None
    with client.stream("GET", f"{base}/gradio_api/call/{api}/{r.json()['event_id']}") as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                return event == "complete", line[5:].strip()
    return False, f"event stream ended after event {event!r}"
