"""Bounded admission for callers outside Gradio's queue (the REST API).

A few requests run, a few more wait, the rest are told at once that the server is busy:
an overloaded server should answer "try again" in milliseconds, not make everyone wait.
"Run" covers reading the spooled upload, decoding, the model and logging; there are more run slots
(ui.predict_tab.model_slots) than model lanes, so requests that wait for a lane meet in the pipeline's batcher
(serving/batcher.py) and go through the model together.
Admission is a separate, non-blocking step so a caller can refuse a request *before* handing it to
a worker thread; running waits for a free slot.

Admission is taken only once a request's body is in (ui/api.py): a client that sends headers and then
nothing must not hold a run/wait slot. Reading bodies has its own ``Allowance``, whose holders the body
timeout (ui/body_timeout.py) evicts, so idle clients can at worst hold reading slots, and only briefly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

BUSY = "The server is busy right now; please try again in a few seconds."


class Busy(RuntimeError):
    """Too many requests in flight; the message is safe to show."""


class Allowance:
    """At most ``limit`` holders at once; one more is refused at once (never waits)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._slots = threading.BoundedSemaphore(limit)

    @contextmanager
    def held(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise Busy(BUSY)
        try:
            yield
        finally:
            self._slots.release()


class Gate:
    def __init__(self, concurrency: int, max_waiting: int):
        if concurrency < 1 or max_waiting < 0:
            raise ValueError("concurrency must be >= 1 and max_waiting >= 0")
        self._running = threading.BoundedSemaphore(concurrency)
        self._admitted = Allowance(concurrency + max_waiting)

    def admitted(self):
        """Never blocks: raises Busy at once when running + waiting requests are at the bound."""
        return self._admitted.held()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Blocks until one of the ``concurrency`` run slots is free (call it inside ``admitted``)."""
        with self._running:
            yield

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self.admitted(), self.running():
            yield
