"""kill -9 in the middle of heavy logging and reviewing; then nothing acknowledged may be missing.

In process: the child (a forked process) logs predictions from two threads and reviews from the main thread; it
prints ``PRED <id>`` to a pipe only after ``log_prediction`` returned the id, and ``ACK <key>`` only after
``decide``/``undo`` returned, i.e. after the commit. The parent kills it at a random moment, 20 times over on the
same database, then checks integrity, acknowledged predictions (replayed from the spool by the next process),
acknowledged decisions and files.

Real app: clients post to a ``python app.py`` that is killed with SIGKILL; every prediction_id a client received
must be in the database once the app has started again.
"""

import itertools
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from review import jobs
from review.db import Decision, Prediction, StoredImage
from tests import review_fixtures as rf
from tests.big_images import photo_jpeg
from tests.browser_support import start_app, wait_for
from tests.review_fixtures import MODEL, build_kit, make_settings, probs, square, upload

services, db_url = rf.services, rf.db_url  # fixtures
RUNS = 20


def child(url: str, data_dir: Path, name: str, out: int, replay_first: bool) -> None:
    """Runs in the forked child until it is killed; writes ``ACK <key>`` to fd ``out`` after each commit."""
    settings = make_settings(data_dir, url, low_confidence=0.9, claim_lease_s=0.5, audit_rate=0.05)
    svc = build_kit(settings, MODEL)
    if replay_first:  # as an app does at start: the dead processes' spools are written before new traffic
        svc.store.flush()
    rng = random.Random(name)

    def say(line: str) -> None:
        os.write(out, (line + "\n").encode())  # one write() per line: atomic on a pipe

    def logger(seed):
        r = random.Random(seed)
        while True:
            img = square((r.randrange(256), r.randrange(256), r.randrange(256)), size=r.choice((8, 16, 24)),
                         mark=r.randrange(1, 64))
            pid = svc.log(**upload(img), probs=probs(r.random() + 0.1, r.random(), r.random()),
                                     source="upload", latency_ms=1.0)
            say(f"PRED {pid}")
            if r.random() < 0.2:
                svc.store.record_feedback(pid, correct=False, claimed_label=r.choice(MODEL.vocab))

    for k in range(2):
        threading.Thread(target=logger, args=(f"{name}:{k}",), daemon=True).start()
    say("READY")
    n = 0
    while True:
        item = svc.desk.next_item(name)
        if item is None:
            time.sleep(0.005)
            continue
        key = f"{name}:{n}:{uuid.uuid4().hex[:8]}"
        action = rng.choice(("confirm", "relabel", "out_of_domain", "skip"))
        res = svc.desk.decide(name, item.item_id, action=action, label="blue" if action == "relabel" else None,
                         idempotency_key=key)
        if res.ok:
            say(f"ACK {key}")
        if n % 7 == 6:
            ukey = f"{key}:undo"
            if svc.desk.undo(name, idempotency_key=ukey).ok:
                say(f"ACK {ukey}")
        n += 1


def run_and_kill(url: str, data_dir: Path, name: str, delay: float, replay_first: bool = True) -> list[str]:
    """Fork a child (a new process, minus the ~1 s of imports a fresh interpreter would spend), kill -9 it.
    Returns the lines it printed (read all along, so a full pipe never slows the child down)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(r)
        try:
            child(url, data_dir, name, w, replay_first)
        finally:
            os._exit(70)  # only reached if child() raised: the parent sees "died by itself"
    os.close(w)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        with os.fdopen(r, "r") as pipe:
            for line in pipe:  # the loggers print before READY too
                lines.append(line.strip())
                if line.strip() == "READY":
                    started.set()
        started.set()  # EOF: the child died

    reader = threading.Thread(target=read)
    reader.start()
    started.wait(120)
    ready = "READY" in lines
    if ready:
        time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    reader.join()
    assert ready and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"child failed before the kill (status {status}); run it alone to see its traceback"
    return lines


def test_kill_9_loses_nothing_acknowledged(services, db_url, tmp_path):
    rng = random.Random(20260101)
    acked: list[str] = []
    predicted: list[str] = []
    for run in range(RUNS):
        # every 4th child is killed while it may still be replaying its predecessors' spools
        lines = run_and_kill(db_url, tmp_path, f"crash{run}", rng.uniform(0.15, 0.6), replay_first=run % 4 != 3)
        acked += [line.split()[1] for line in lines if line.startswith("ACK ")]
        predicted += [line.split()[1] for line in lines if line.startswith("PRED ")]

    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    svc = services(db_url)
    svc.store.flush()  # includes replaying the spools the killed children left
    stored = set(svc.store.transaction(lambda s: list(s.scalars(select(Decision.idempotency_key))), read=True))
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} acknowledged decisions lost, e.g. {missing[:3]}"
    logged = set(svc.store.transaction(lambda s: list(s.scalars(select(Prediction.id))), read=True))
    lost = [p for p in predicted if p not in logged]
    assert not lost, f"{len(lost)} of {len(predicted)} acknowledged predictions lost, e.g. {lost[:3]}"
    shas = svc.store.transaction(lambda s: set(s.scalars(select(Prediction.image_sha256).where(
        Prediction.image_sha256.is_not(None)))) | set(s.scalars(select(StoredImage.sha256))), read=True)
    assert shas, "the children logged nothing: the test proves nothing"
    assert [sha for sha in shas if not svc.store.images.exists(sha)] == []
    report = jobs.reconcile(svc.store, grace_s=0)
    assert report.missing_files == []
    counts = svc.desk.counts()
    print(f"crash test ({db_url.split(':')[0]}): {RUNS} kills, {len(acked)} acknowledged decisions and "
          f"{len(predicted)} acknowledged predictions all present ({counts['log_replayed']} replayed at the last start), "
          f"{counts['predictions']} predictions, {len(shas)} images, {len(report.orphan_files)} orphan files, "
          f"{len(report.temp_files)} temp files")
    assert len(acked) >= RUNS  # reviews really happened between the kills
    # the database stays usable after all that: a normal session reviews on
    item = svc.desk.next_item("after")
    if item is not None:
        assert svc.desk.decide("after", item.item_id, action="confirm", label=None, idempotency_key="after").ok
    svc.store.close()
    assert list((tmp_path / "data" / "spool").iterdir()) == [], "replayed spools, and a clean close's own, are removed"


@pytest.mark.slow
def test_sigkill_of_the_app_loses_no_acknowledged_prediction(tmp_path, demo_settings, demo_predictor):
    data = tmp_path / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")  # converted bundle: start-up is just imports
    photos = [photo_jpeg(900, 700, seed=i, noise=8) for i in range(24)]  # enough work for the writer to lag
    app = start_app(data)
    acked: list[str] = []
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=app.url, timeout=30) as c:
            for i in itertools.count(k):
                try:
                    r = c.post("/api/v1/predict", files={"file": ("p.jpg", photos[i % len(photos)], "image/jpeg")})
                except httpx.TransportError:  # the server was killed under this request: never acknowledged
                    return
                if r.status_code == 200:
                    acked.append(r.json()["prediction_id"])
                if stop.is_set():
                    return

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    try:
        for t in clients:
            t.start()
        wait_for(lambda: len(acked) >= 200, timeout=120, what="200 acknowledged predictions")
        app.proc.kill()  # SIGKILL while the clients keep posting
        app.proc.wait(10)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
        app.stop()
    db = sqlite3.connect(data / "loupe.db")
    before = {row[0] for row in db.execute("SELECT id FROM predictions")}
    print(f"SIGKILL: {len(acked)} predictions acknowledged, {len(set(acked) - before)} not in the database "
          "when the process died")
    again = start_app(data)  # replays the dead process's spool in the background
    try:
        def present() -> bool:
            have = {row[0] for row in db.execute("SELECT id FROM predictions")}
            return set(acked) <= have

        try:
            wait_for(present, timeout=60, what="every acknowledged prediction")
        except AssertionError:
            have = {row[0] for row in db.execute("SELECT id FROM predictions")}
            raise AssertionError(f"{len(set(acked) - have)} of {len(acked)} acknowledged predictions lost") from None
    finally:
        db.close()
        assert again.stop() == 0, again.log()
