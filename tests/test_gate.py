"""The REST gate: bounded running + waiting; refusals are immediate and never block."""

from __future__ import annotations

import threading
import time

import pytest

from serving.gate import Allowance, Busy, Gate


def test_gate_admits_running_plus_waiting_then_refuses_at_once():
    gate = Gate(concurrency=1, max_waiting=1)
    release = threading.Event()
    entered = threading.Event()

    def hold():
        with gate.slot():
            entered.set()
            release.wait(5)

    runner = threading.Thread(target=hold)
    runner.start()
    entered.wait(5)
    waiting = gate.admitted()
    waiting.__enter__()  # the one allowed waiter
    t0 = time.perf_counter()
    with pytest.raises(Busy, match="try again"):
        with gate.admitted():
            pass
    assert time.perf_counter() - t0 < 0.05
    release.set()
    runner.join(5)
    waiting.__exit__(None, None, None)
    with gate.slot():  # everything released: admitted again
        pass


def test_running_waits_for_a_free_slot():
    gate = Gate(concurrency=1, max_waiting=4)
    order = []

    def work(name):
        with gate.slot():
            order.append(f"start {name}")
            time.sleep(0.05)
            order.append(f"end {name}")

    threads = [threading.Thread(target=work, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert order[0].startswith("start") and order[1].startswith("end")  # never two at once
    assert len(order) == 4


def test_gate_rejects_nonsense_bounds():
    with pytest.raises(ValueError):
        Gate(concurrency=0, max_waiting=1)


def test_allowance_refuses_at_once_when_full_and_frees_on_error():
    reading = Allowance(2)
    with reading.held(), reading.held():
        t0 = time.perf_counter()
        with pytest.raises(Busy, match="try again"):
            with reading.held():
                pass
        assert time.perf_counter() - t0 < 0.05
    with pytest.raises(TimeoutError):  # e.g. a body read that timed out: the slot must come back
        with reading.held():
            raise TimeoutError
    with reading.held(), reading.held():
        pass
    with pytest.raises(ValueError):
        Allowance(0)
