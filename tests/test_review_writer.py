import os
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from review.db import Prediction
from review.writer import BackgroundWriter
from serving.imageio import image_stats
from tests import review_fixtures as rf
from tests.review_fixtures import MODEL, probs, square, upload

services, sqlite_url = rf.services, rf.sqlite_url  # fixtures


def test_close_drains_everything():
    written = []

    def slow(batch):
        time.sleep(0.002)
        written.extend(batch)

    w = BackgroundWriter(slow, maxsize=1000)
    for i in range(500):
        w.submit(i, key=str(i))
    assert w.is_pending("499") or "499" in map(str, written)
    w.close()
    assert written == list(range(500)) and w.written == 500
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(1)


def test_full_queue_blocks_then_drops_loudly(caplog):
    gate = threading.Event()
    w = BackgroundWriter(lambda batch: gate.wait(), maxsize=2, batch_max=1, block_s=0.05)
    results = [w.submit(i) for i in range(6)]  # 1 in the writer's hands, 2 queued, the rest wait 50 ms each
    assert results.count(False) >= 2 and w.dropped == results.count(False)
    assert "dropped" in caplog.text
    gate.set()
    w.close()
    assert w.written == results.count(True)


def test_a_full_queue_only_slows_the_caller_while_the_writer_catches_up():
    w = BackgroundWriter(lambda batch: time.sleep(0.01), maxsize=2, batch_max=1, block_s=5.0)
    t0 = time.perf_counter()
    assert all(w.submit(i) for i in range(10))
    assert time.perf_counter() - t0 > 0.04  # it waited...
    w.close()
    assert (w.written, w.dropped) == (10, 0)  # ...and nothing was lost


def test_transient_database_errors_are_retried():
    calls = []

    def flaky(batch):
        calls.append(list(batch))
        if len(calls) < 3:
            raise OperationalError("INSERT", {}, Exception("database is locked"))

    w = BackgroundWriter(flaky)
    w.submit("a")
    w.close()
    assert calls == [["a"]] * 3 and w.written == 1 and w.failed == 0


def test_a_bad_record_is_isolated_and_counted(caplog):
    written = []
    gate = threading.Event()

    def write(batch):
        gate.wait()
        if "bad" in batch:
            raise ValueError("cannot encode")
        written.extend(batch)

    w = BackgroundWriter(write, batch_max=10)
    for rec in ("a", "bad", "b"):
        w.submit(rec)
    gate.set()
    w.close()
    assert sorted(written) == ["a", "b"] and w.failed == 1
    assert "could not be written" in caplog.text and "cannot encode" in caplog.text


def test_logging_costs_the_caller_microseconds(services, sqlite_url):
    svc = services(sqlite_url)
    sent, p = upload(square((1, 2, 3), size=224)), probs(0.5, 0.3, 0.2)
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        svc.log(**sent, probs=p, source="api", latency_ms=1.0)
        times.append(time.perf_counter() - t0)
    svc.store.flush()
    p50 = float(np.median(times))
    print(f"log_prediction p50 {p50 * 1e6:.0f} us")
    assert p50 < 0.002  # a queue.put, not a database write (those take milliseconds)
    assert svc.desk.counts()["predictions"] == 200


def test_service_close_flushes(services, sqlite_url, tmp_path):
    svc = services(sqlite_url)
    for i in range(40):
        svc.log(**upload(square((i, 0, 0))), probs=probs(0.9, 0.05, 0.05), source="webcam", latency_ms=1)
    svc.store.close()
    again = services(sqlite_url)
    assert again.desk.counts()["predictions"] == 40


def test_the_queue_is_bounded_in_bytes_and_a_big_record_still_goes_through_alone():
    gate = threading.Event()
    held = []

    def write(batch):
        gate.wait()

    w = BackgroundWriter(write, maxsize=1000, max_bytes=100, batch_max=1, block_s=0.05)
    assert w.submit("a", size=60)  # the writer takes it and blocks on the gate: still counted
    held.append(w.backlog_bytes())
    assert w.submit("b", size=40)  # 100: exactly the budget
    assert not w.submit("c", size=1)  # over it: waits block_s, then dropped
    held.append(w.backlog_bytes())
    gate.set()
    w.flush()
    assert w.backlog_bytes() == 0
    assert w.submit("huge", size=500)  # larger than the whole budget: let through when nothing else is held
    w.close()
    assert held == [60, 100] and (w.written, w.dropped) == (3, 1)


def _spool_in_child(root, records, *, torn: bytes = b"") -> None:
    """A process that spools records and dies without closing its spool (as under kill -9)."""
    from review.spool import Spool

    pid = os.fork()
    if pid == 0:
        try:
            spool = Spool(root)
            for meta, data in records:
                spool.append(meta, data)
            if torn:  # a record cut short by a crash or power cut
                with open(next(spool.dir.glob("*.seg")), "ab") as f:
                    f.write(torn)
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


def test_spool_of_a_dead_process_is_claimed_once_and_read_up_to_a_torn_tail(tmp_path):
    from review.spool import HEADER, Spool, claim_orphans

    root = tmp_path / "spool"
    live = Spool(root)  # this process is alive: its spool is never claimed
    live.append({"kind": "x", "n": 0}, b"mine")
    records = [({"kind": "x", "n": i}, bytes([i]) * (i * 1000)) for i in range(5)]
    _spool_in_child(root, records, torn=HEADER.pack(b"LPS1", 10, 1 << 30, 0) + b"{")
    (orphan,) = claim_orphans(root)
    assert orphan.dir != live.dir and claim_orphans(root) == []  # claimed (locked) by us now
    assert list(orphan.records()) == records  # in order, the torn tail left out
    orphan.remove()
    assert [p.name for p in root.iterdir()] == [live.dir.name]
    live.done([0])
    live.close()  # everything done: a clean close leaves nothing
    assert list(root.iterdir()) == []


def test_replay_skips_what_is_already_in_the_database(services, sqlite_url, tmp_path):
    from review import ingest

    svc = services(sqlite_url)
    first = svc.log(**upload(square((9, 9, 9))), probs=probs(0.9, 0.05, 0.05), source="api",
                               latency_ms=1)
    svc.store.flush()
    row = svc.store.transaction(lambda s: s.get(Prediction, first), read=True)
    svc.store.close()
    # a dead process's spool still holding that committed record (killed before it emptied its spool), then two
    # records that never reached the database: a prediction and feedback on it
    done = ingest.PredictionRecord(id=first, created=row.created, source="api", model_version=row.model_version,
                                   vocab=MODEL.vocab, probs=probs(0.9, 0.05, 0.05), latency_ms=1.0,
                                   stats={"width": 16, "height": 16, "brightness": 0.1})
    new = ingest.PredictionRecord(id="b" * 32, created=row.created, source="upload", model_version=row.model_version,
                                  vocab=MODEL.vocab, probs=probs(0.2, 0.3, 0.5), latency_ms=1.0,
                                  data=upload(square((1, 200, 3)))["data"],
                                  stats={"width": 16, "height": 16, "brightness": 0.4})
    feedback = ingest.FeedbackRecord("b" * 32, correct=False, claimed_label="green")
    _spool_in_child(tmp_path / "data" / "spool", [r.spooled() for r in (done, new, feedback)])
    again = services(sqlite_url)
    again.store.flush()
    counts = again.desk.counts()
    assert counts["predictions"] == 2 and counts["log_replayed"] == 3 and counts["log_failed"] == 0
    replayed = again.store.transaction(lambda s: s.get(Prediction, "b" * 32), read=True)
    assert replayed.claimed_label == "green" and replayed.image_sha256 is not None
    assert again.store.images.exists(replayed.image_sha256)


def test_with_storing_off_the_upload_never_reaches_disk_not_even_the_spool(services, sqlite_url, tmp_path):
    svc = services(sqlite_url, store_uploads=False)
    sent = upload(square((1, 2, 3), size=64, mark=5))
    gate = threading.Event()
    write = svc.store._writer._write_batch
    svc.store._writer._write_batch = lambda batch: (gate.wait(), write(batch))  # hold the records in the spool
    svc.log(**sent, probs=probs(0.5, 0.3, 0.2), source="upload", latency_ms=1)
    spooled = b"".join(p.read_bytes() for p in (tmp_path / "data" / "spool").rglob("*.seg"))
    assert b'"keep_image":false' in spooled and sent["data"] not in spooled
    gate.set()
    svc.store.flush()
    assert svc.desk.counts()["predictions"] == 1 and list(svc.store.images.iter_shas()) == []


def test_the_writer_measures_brightness_off_the_request_path_stored_or_not(services, sqlite_url):
    img = square((200, 10, 10), size=80, mark=3)
    expected = image_stats(img)["brightness"]
    for store in (True, False):
        svc = services(sqlite_url, store_uploads=store)
        sent = upload(img)
        pid = svc.log(data=sent["data"], stats=image_stats(img, brightness=False), probs=probs(1, 1, 1),
                                 source="api", latency_ms=1)
        svc.store.flush()
        row = svc.store.transaction(lambda s, pid=pid: s.get(Prediction, pid), read=True)
        assert (row.width, row.height) == (80, 80) and row.brightness == pytest.approx(expected, abs=1e-6)
        assert (row.image_sha256 is not None) is store
        svc.store.close()


def test_with_the_spool_off_nothing_is_spooled_but_dead_processes_spools_are_still_replayed(services, sqlite_url,
                                                                                               tmp_path):
    from review import ingest

    first = services(sqlite_url)  # registers the model, as the dead process had
    first.store.close()
    rec = ingest.PredictionRecord(id="c" * 32, created=datetime.now(UTC), source="api", model_version=MODEL.version,
                                  vocab=MODEL.vocab, probs=probs(0.2, 0.3, 0.5), latency_ms=1.0, data=None,
                                  stats={"width": 16, "height": 16, "brightness": 0.4}, keep_image=False)
    spool = tmp_path / "data" / "spool"
    _spool_in_child(spool, [rec.spooled()])
    svc = services(sqlite_url, log_spool=False)
    svc.log(**upload(square((5, 5, 5))), probs=probs(1, 1, 1), source="api", latency_ms=1)
    svc.store.flush()
    assert svc.desk.counts()["predictions"] == 2 and svc.desk.counts()["log_replayed"] == 1
    assert list(spool.iterdir()) == []  # the orphan is gone and this service made none
