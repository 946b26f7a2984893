
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from bench import synthetic
from review import __main__ as cli
from review import jobs
from review.auth import check_password
from review.db import Prediction, QueueEntry, ShadowPrediction
from review.types import ReviewError
from tests import review_fixtures as rf
from tests.review_fixtures import MODEL, FakeClock, FakePredictor, probs, square, upload

services, sqlite_url, db_url = rf.services, rf.sqlite_url, rf.db_url  # fixtures
ROOT = Path(__file__).resolve().parents[1]


def log(svc, img, p=None, **kw):
    pid = svc.log(**upload(img), probs=probs(0.5, 0.3, 0.2) if p is None else p, source="upload",
                             latency_ms=1, **kw)
    svc.store.flush()
    return pid


def test_reconcile_finds_and_fixes_both_directions(services, sqlite_url):
    svc = services(sqlite_url)
    for i in range(3):
        log(svc, square((i, 50, 50)))
    shas = sorted(svc.store.images.iter_shas())
    lost = shas[0]
    svc.store.images.path(lost).unlink()
    old = time.time() - 7200
    orphan = svc.store.images.put_bytes(b"written, then the process died before its row")
    os.utime(svc.store.images.path(orphan), (old, old))
    svc.store.images.put_bytes(b"young orphan: its row may be on its way")
    tmp = svc.store.images.root / "ab" / ".abcdef12-x.tmp"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(b"half a file")
    os.utime(tmp, (old, old))

    report = jobs.reconcile(svc.store)
    assert (report.missing_files, report.orphan_files, report.young_orphans) == ([lost], [orphan], 1)
    assert report.temp_files == [str(tmp)] and not report.clean
    assert svc.store.images.exists(orphan)  # without --fix nothing changes

    assert jobs.reconcile(svc.store, fix=True).fixed
    after = jobs.reconcile(svc.store)
    assert after.clean and after.young_orphans == 1 and not svc.store.images.exists(orphan) and not tmp.exists()
    rows = svc.store.transaction(lambda s: s.execute(select(Prediction.image_sha256)).scalars().all(), read=True)
    assert rows.count(None) == 1 and lost not in rows  # the prediction stays, without its image
    status = svc.store.transaction(lambda s: s.scalar(select(QueueEntry.status).where(QueueEntry.image_sha256 == lost)),
                             read=True)
    assert status == "purged" and svc.desk.counts()["queue_open"] == 2


def test_purge_keeps_decisions_and_dataset(services, sqlite_url, tmp_path):
    clock = FakeClock()
    svc = services(sqlite_url, clock=clock)
    a, b, c = square((10, 1, 1)), square((20, 1, 1)), square((30, 1, 1))
    for img in (a, b, c):
        log(svc, img)
    jobs.import_dataset(svc.store, svc.pipeline(lambda imgs: np.tile(probs(0.1, 0.1, 0.8), (len(imgs), 1))),
                        _one_image_dataset(tmp_path))
    item = svc.desk.next_item("alice")
    assert item.reasons == ("dataset",)
    svc.desk.decide("alice", item.item_id, action="relabel", label="blue", idempotency_key="ds")
    decided = svc.desk.next_item("alice")
    svc.desk.decide("alice", decided.item_id, action="confirm", label=None, idempotency_key="a")
    clock.advance(days=10)
    log(svc, b.copy())  # b is seen again recently: its image must stay
    new = log(svc, square((40, 1, 1)))
    # a shadow candidate's answers to that traffic: purged with it, kept when recent
    svc.store.transaction(lambda s: s.add_all([ShadowPrediction(
        prediction_id=pid, created=when, role="shadow", model_version="cand", served_version=MODEL.version,
        served_label="red", predicted="blue", confidence=0.6, probs=[0.2, 0.2, 0.6], agrees=False, latency_ms=1.0)
        for pid, when in (("old", clock() - timedelta(days=10)), ("new", clock()))]))

    with pytest.raises(ReviewError, match="retention"):
        jobs.purge(svc.store)
    dry = jobs.purge(svc.store, days=5, dry_run=True)
    assert dry.predictions == 3 and len(dry.images) == 2 and svc.desk.counts()["predictions"] == 6
    assert dry.shadow_predictions == 1
    report = jobs.purge(svc.store, days=5)
    assert report.predictions == 3 and len(report.images) == 2 and report.items_closed == 1
    assert report.shadow_predictions == 1
    assert svc.store.transaction(lambda s: s.scalars(select(ShadowPrediction.prediction_id)).all(),
                                 read=True) == ["new"]
    assert all(not svc.store.images.exists(sha) for sha in report.images) and decided.image_sha256 in report.images
    counts = svc.desk.counts()
    assert counts["predictions"] == 3 and counts["queue_purged"] == 1 and counts["queue_done"] == 2
    assert counts["decisions"]["confirm"] == 1  # decisions are kept
    ids = []
    while (it := svc.desk.next_item("bob")) is not None:
        ids.append(it.prediction_id)
        svc.desk.decide("bob", it.item_id, action="confirm", label=None, idempotency_key=it.prediction_id)
    assert new in ids and len(ids) == 2  # b's open item now shows its recent prediction
    export = jobs.export_reviewed(svc.store, tmp_path / "export")
    assert export.missing_images == 1 and export.labelled == 3  # dataset item + b + the new one
    assert jobs.reconcile(svc.store, grace_s=0).clean


def _one_image_dataset(tmp_path):
    (tmp_path / "ds" / "red").mkdir(parents=True)
    square((200, 0, 0), mark=3).save(tmp_path / "ds" / "red" / "x.png")
    return tmp_path / "ds"


def test_rescore_queues_what_the_new_model_contradicts(services, sqlite_url):
    old = services(sqlite_url)
    agree = log(old, square((1, 1, 1)), probs(0.9, 0.05, 0.05), claimed_label="red")
    log(old, square((2, 2, 2)), probs(0.9, 0.05, 0.05))  # no label: nothing to rescore
    assert old.desk.counts()["queue_open"] == 0  # confident, and the old model agrees with the claimed label
    new_model = replace(MODEL, sha256="cd" * 32)
    new = services(sqlite_url, model=new_model)
    contradict = lambda imgs: np.tile(probs(0.05, 0.05, 0.9), (len(imgs), 1))  # noqa: E731
    done = jobs.rescore_labelled(new.store, FakePredictor(new_model, contradict))
    assert done == {"scored": 1, "queued": 1, "missing_images": 0}
    item = new.desk.next_item("alice")
    assert item.reasons == ("high_loss",) and item.model_version == new_model.version and item.predicted == "blue"
    assert item.claimed_labels == ("red",) and item.seen == 2
    assert jobs.rescore_labelled(new.store, FakePredictor(new_model, contradict))["scored"] == 0  # done already
    assert agree


def test_synthetic_population(db_url, services):
    svc = services(db_url)
    made = synthetic.populate(svc.store.engine, 3000, chunk=1000)
    counts = svc.desk.counts()
    assert counts["predictions"] == 3000 and counts["queue_open"] == made["queued"] > 0
    best = svc.store.transaction(lambda s: s.scalar(select(QueueEntry.priority).order_by(QueueEntry.priority.desc())),
                           read=True)
    item = svc.desk.next_item("bench")
    got = svc.store.transaction(lambda s: s.get(QueueEntry, item.item_id).priority, read=True)
    assert got == best


def test_cli_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOUPE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("LOUPE_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("LOUPE_RETENTION_DAYS", raising=False)
    assert cli.main(["reconcile"]) == 0
    assert json.loads(capsys.readouterr().out)["clean"] is True
    assert cli.main(["purge"]) == 2
    assert "LOUPE_RETENTION_DAYS" in capsys.readouterr().err
    assert cli.main(["purge", "--days", "1", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"] == 0
    assert cli.main(["export", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "labels.csv").read_text().splitlines() == ["fname,label,is_valid"]


def test_cli_hash_password_subprocess():
    out = subprocess.run([sys.executable, "-m", "review", "hash-password"], input="s3cret\n", text=True,
                         capture_output=True, cwd=ROOT, timeout=60, check=True).stdout.strip()
    assert out.startswith("pbkdf2_sha256$") and check_password("s3cret", out) and not check_password("x", out)


def test_storage_guard_says_full_once_and_notices_freed_space(tmp_path, caplog):
    from review.imagestore import StorageGuard

    used = [0]
    guard = StorageGuard(tmp_path, max_bytes=1000, min_free_bytes=0, used=lambda: used[0], resync_s=0)
    assert guard.check() is None
    guard.added(1200)
    used[0] = 1200  # what the images table says
    for _ in range(3):
        assert "its cap" in guard.check()
    assert caplog.text.count("image storage full") == 1  # one line, however many checks
    used[0] = 0  # a purge elsewhere (the CLI) freed the store
    assert guard.check() is None and guard.full is None
    assert "room again" in caplog.text
    assert "free on the disk" in StorageGuard(tmp_path, max_bytes=None, min_free_bytes=1 << 60,
                                              used=lambda: 0).check()
