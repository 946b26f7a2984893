"""Several reviewers and loggers at once, on SQLite and on PostgreSQL (two services = two app processes)."""

import threading
import time
from collections import Counter

from sqlalchemy import func, select

from review.db import Decision, Prediction
from tests import review_fixtures as rf
from tests.review_fixtures import probs, square, upload

services, db_url = rf.services, rf.db_url  # fixtures


def run_threads(targets, timeout=60):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # reported to the test below, with its traceback
                errors.append(exc)
                raise
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "threads hung"
    if errors:
        raise errors[0]


def fill(svc, n, start=0):
    for i in range(start, start + n):
        svc.log(**upload(square((i % 256, i // 256, 7), mark=1)), probs=probs(0.5, 0.3, 0.2),
                           source="api", latency_ms=1.0)
    svc.store.flush()


def test_two_reviewers_never_get_the_same_item(services, db_url):
    a, b = services(db_url), services(db_url)
    fill(a, 60)
    handed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def reviewer(name, svc):
        def run():
            while (item := svc.desk.next_item(name)) is not None:
                with lock:
                    handed.append((name, item.item_id))
                res = svc.desk.decide(name, item.item_id, action="confirm", label=None, idempotency_key=f"{name}:{item.item_id}")
                assert res.ok, res
        return run

    run_threads([reviewer(f"r{i}", a if i % 2 else b) for i in range(4)])
    ids = [i for _, i in handed]
    assert len(ids) == 60 and len(set(ids)) == 60, Counter(ids).most_common(3)
    assert len({n for n, _ in handed}) > 1  # the work really was shared
    counts = a.desk.counts()
    assert counts["queue_done"] == 60 and counts["decisions"]["confirm"] == 60


def test_racing_double_submit_records_once(services, db_url):
    a, b = services(db_url), services(db_url)
    fill(a, 1)
    item = a.desk.next_item("alice")
    results = []
    barrier = threading.Barrier(4)

    def submit(svc):
        def run():
            barrier.wait()
            results.append(svc.desk.decide("alice", item.item_id, action="relabel", label="blue", idempotency_key="same"))
        return run

    run_threads([submit(a), submit(b), submit(a), submit(b)])
    assert len(results) == 4 and all(r == results[0] for r in results) and results[0].ok
    assert a.store.transaction(lambda s: len(s.scalars(select(Decision)).all()), read=True) == 1


def test_eight_loggers_and_four_reviewers(services, db_url):
    # low_confidence=1.0 queues every prediction, so reviewers always have work while loggers write
    a, b = services(db_url, low_confidence=1.0), services(db_url, low_confidence=1.0)
    per_logger, loggers = 25, 8
    all_logged = threading.Event()
    acknowledged: dict[str, tuple[int, str]] = {}
    undone: list[str] = []
    lock = threading.Lock()

    def logger(k):
        svc = a if k % 2 else b

        def run():
            for i in range(per_logger):
                n = k * per_logger + i
                pid = svc.log(**upload(square((n % 256, 9, n // 256), size=12)), probs=probs(0.5, 0.3, 0.2),
                                         source="upload", latency_ms=2.0)
                if i % 5 == 0:
                    svc.store.record_feedback(pid, correct=False, claimed_label="blue")
        return run

    def reviewer(r):
        svc, name = (a if r % 2 else b), f"rev{r}"

        def run():
            n = 0
            while True:
                item = svc.desk.next_item(name)
                if item is None:
                    if all_logged.is_set():
                        return
                    time.sleep(0.005)
                    continue
                action = ("confirm", "relabel", "out_of_domain")[n % 3]
                key = f"{name}:{n}"
                res = svc.desk.decide(name, item.item_id, action=action, label="green" if action == "relabel" else None,
                                 idempotency_key=key)
                assert res.ok, res
                with lock:
                    acknowledged[key] = (item.item_id, action)
                if n % 10 == 9:
                    u = svc.desk.undo(name, idempotency_key=f"{name}:undo:{n}")
                    assert u.ok and u.item_id == item.item_id
                    with lock:
                        undone.append(key)
                n += 1
        return run

    def coordinator():
        for t in log_threads:
            t.join()
        a.store.flush()
        b.store.flush()
        all_logged.set()

    log_threads = [threading.Thread(target=logger(k)) for k in range(loggers)]
    for t in log_threads:
        t.start()
    run_threads([reviewer(r) for r in range(4)] + [coordinator])

    total = loggers * per_logger
    counts = a.desk.counts()
    assert counts["predictions"] == total
    assert counts["queue_open"] == 0 and counts["queue_done"] == total
    decided = sum(counts["decisions"].values())
    assert decided == total == len(acknowledged) - len(undone)
    assert counts["undos"] == len(undone)
    for svc in (a, b):
        assert (svc.desk.counts()["log_failed"], svc.desk.counts()["log_dropped"]) == (0, 0)
    keys = set(a.store.transaction(lambda s: list(s.scalars(select(Decision.idempotency_key))), read=True))
    assert set(acknowledged) <= keys
    # feedback for every 5th prediction, sent while it was still queued for writing, arrived
    claimed = a.store.transaction(lambda s: s.scalar(select(func.count()).select_from(Prediction).where(
        Prediction.claimed_label == "blue", Prediction.loss.is_not(None))), read=True)
    assert claimed == total // 5
