import threading
import time

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from review.writer import BackgroundWriter
from tests import review_fixtures as rf
from tests.review_fixtures import probs, square, upload

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
        svc.log_prediction(**sent, probs=p, source="api", latency_ms=1.0)
        times.append(time.perf_counter() - t0)
    svc.flush()
    p50 = float(np.median(times))
    print(f"log_prediction p50 {p50 * 1e6:.0f} us")
    assert p50 < 0.002  # a queue.put, not a database write (those take milliseconds)
    assert svc.counts()["predictions"] == 200


def test_service_close_flushes(services, sqlite_url, tmp_path):
    svc = services(sqlite_url)
    for i in range(40):
        svc.log_prediction(**upload(square((i, 0, 0))), probs=probs(0.9, 0.05, 0.05), source="webcam", latency_ms=1)
    svc.close()
    again = services(sqlite_url)
    assert again.counts()["predictions"] == 40
