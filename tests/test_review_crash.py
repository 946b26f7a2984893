"""kill -9 in the middle of heavy logging and reviewing, 20 times; then nothing acknowledged may be missing.

The child (a forked process) logs predictions from two threads and reviews from the main thread; it prints
``ACK <key>`` to a pipe only after ``decide``/``undo`` returned, i.e. after the commit. The parent kills it at a
random moment, 20 times over on the same database, then checks integrity, acknowledged decisions and files.
"""

import os
import random
import signal
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import select

from review.db import Decision, Prediction, StoredImage
from review.service import ReviewService
from tests import review_fixtures as rf
from tests.review_fixtures import MODEL, make_settings, probs, square, upload

services, db_url = rf.services, rf.db_url  # fixtures
RUNS = 20


def child(url: str, data_dir: Path, name: str, out: int) -> None:
    """Runs in the forked child until it is killed; writes ``ACK <key>`` to fd ``out`` after each commit."""
    settings = make_settings(data_dir, url, low_confidence=0.9, claim_lease_s=0.5, audit_rate=0.05)
    svc = ReviewService.build(settings, MODEL)
    rng = random.Random(name)

    def say(line: str) -> None:
        os.write(out, (line + "\n").encode())  # one write() per line: atomic on a pipe

    def logger(seed):
        r = random.Random(seed)
        while True:
            img = square((r.randrange(256), r.randrange(256), r.randrange(256)), size=r.choice((8, 16, 24)),
                         mark=r.randrange(1, 64))
            pid = svc.log_prediction(**upload(img), probs=probs(r.random() + 0.1, r.random(), r.random()),
                                     source="upload", latency_ms=1.0)
            if r.random() < 0.2:
                svc.record_feedback(pid, correct=False, claimed_label=r.choice(MODEL.vocab))

    for k in range(2):
        threading.Thread(target=logger, args=(f"{name}:{k}",), daemon=True).start()
    say("READY")
    n = 0
    while True:
        item = svc.next_item(name)
        if item is None:
            time.sleep(0.005)
            continue
        key = f"{name}:{n}:{uuid.uuid4().hex[:8]}"
        action = rng.choice(("confirm", "relabel", "out_of_domain", "skip"))
        res = svc.decide(name, item.item_id, action=action, label="blue" if action == "relabel" else None,
                         idempotency_key=key)
        if res.ok:
            say(f"ACK {key}")
        if n % 7 == 6:
            ukey = f"{key}:undo"
            if svc.undo(name, idempotency_key=ukey).ok:
                say(f"ACK {ukey}")
        n += 1


def run_and_kill(url: str, data_dir: Path, name: str, delay: float) -> list[str]:
    """Fork a child (a new process, minus the ~1 s of imports a fresh interpreter would spend), kill -9 it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(r)
        try:
            child(url, data_dir, name, w)
        finally:
            os._exit(70)  # only reached if child() raised: the parent sees "died by itself"
    os.close(w)
    with os.fdopen(r, "r") as pipe:
        ready = pipe.readline().strip() == "READY"
        if ready:
            time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        lines = pipe.read().splitlines()
    assert ready and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"child failed before the kill (status {status}); run it alone to see its traceback"
    return [line.split()[1] for line in lines if line.startswith("ACK ")]


def test_kill_9_loses_nothing_acknowledged(services, db_url, tmp_path):
    rng = random.Random(20260101)
    acked: list[str] = []
    for run in range(RUNS):
        keys = run_and_kill(db_url, tmp_path, f"crash{run}", rng.uniform(0.15, 0.6))
        acked += keys

    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    svc = services(db_url)
    stored = set(svc.transaction(lambda s: list(s.scalars(select(Decision.idempotency_key))), read=True))
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} acknowledged decisions lost, e.g. {missing[:3]}"
    shas = svc.transaction(lambda s: set(s.scalars(select(Prediction.image_sha256).where(
        Prediction.image_sha256.is_not(None)))) | set(s.scalars(select(StoredImage.sha256))), read=True)
    assert shas, "the children logged nothing: the test proves nothing"
    assert [sha for sha in shas if not svc.store.exists(sha)] == []
    report = svc.reconcile(grace_s=0)
    assert report.missing_files == []
    counts = svc.counts()
    print(f"crash test ({db_url.split(':')[0]}): {RUNS} kills, {len(acked)} acknowledged decisions all present, "
          f"{counts['predictions']} predictions, {len(shas)} images, {len(report.orphan_files)} orphan files, "
          f"{len(report.temp_files)} temp files")
    assert len(acked) >= RUNS  # reviews really happened between the kills
    # the database stays usable after all that: a normal session reviews on
    item = svc.next_item("after")
    if item is not None:
        assert svc.decide("after", item.item_id, action="confirm", label=None, idempotency_key="after").ok

