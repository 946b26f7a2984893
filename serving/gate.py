"""Bounded admission for callers outside Gradio's queue (the REST API).

A few requests run, a few more wait, the rest are told at once that the server is busy:
an overloaded server should answer "try again" in milliseconds, not make everyone wait.
Admission is a separate, non-blocking step so a caller can refuse a request *before* reading
its body or handing it to a worker thread; running waits for a free slot.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(RuntimeError):
    """Too many requests in flight; the message is safe to show."""


class Gate:
    def __init__(self, concurrency: int, max_waiting: int):
        if concurrency < 1 or max_waiting < 0:
            raise ValueError("concurrency must be >= 1 and max_waiting >= 0")
        self._running = threading.BoundedSemaphore(concurrency)
        self._admitted = threading.BoundedSemaphore(concurrency + max_waiting)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Never blocks: raises Busy at once when running + waiting requests are at the bound."""
        if not self._admitted.acquire(blocking=False):
            raise Busy("The server is busy right now; please try again in a few seconds.")
        try:
            yield
        finally:
            self._admitted.release()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Blocks until one of the ``concurrency`` run slots is free (call it inside ``admitted``)."""
        with self._running:
            yield

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self.admitted(), self.running():
            yield
