"""Background writer: logging a prediction costs the request one append to a bounded deque (and to the spool).

One daemon thread drains a bounded FIFO in batches and hands each batch to ``write_batch`` (image files first,
then all rows in ONE transaction). FIFO order means feedback always lands after the prediction it is about.

Bounded memory: the queue holds at most ``maxsize`` records AND at most ``max_bytes`` of record payload (the
uploads' encoded bytes), counted until the record is written, so the batch in the writer's hands counts too.
A single record larger than ``max_bytes`` is let through when nothing else is held.

Back-pressure: when the queue is full (the database is slower than the traffic, or down) the caller blocks for
up to ``block_s`` seconds - slower answers rather than lost records. If the queue is still full after that,
the record is dropped, logged at ERROR and counted in ``dropped`` (counts()["log_dropped"]): serving answers
matters more than logging them, and the loss is loud, never silent.

Durability: with a ``spool`` (review.spool), every accepted record is appended to it before ``submit`` returns,
so a kill -9 loses nothing accepted; the writer fsyncs it about once a second and tells it what is written.
``replay``: batches recovered from a dead process's spool, written first (before anything submitted here).

Failures: an ``OperationalError`` (lock timeout, lost connection) is retried with backoff, forever, because
the data is fine and the database will come back; any other error is a bad record: the batch is retried one
record at a time and the records that still fail are logged with their traceback and counted in ``failed``.
``close()`` drains everything still queued (clean shutdown loses nothing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from sqlalchemy.exc import OperationalError

from review.spool import Spool

log = logging.getLogger(__name__)

class BackgroundWriter:
    def __init__(self, write_batch: Callable[[list], None], *, maxsize: int = 256, max_bytes: int = 64 << 20,
                 batch_max: int = 16, block_s: float = 5.0, linger_s: float = 0.05, spool: Spool | None = None,
                 replay: Iterable[list] = (), name: str = "review-writer"):
        self._write_batch = write_batch
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._batch_max = batch_max
        self._block_s = block_s
        # The writer is not woken per record: waking a thread on every request costs the request a GIL
        # hand-off (measured ~10x the cost of the append itself). It wakes when a batch is full, when someone
        # flushes or closes, and otherwise every linger_s.
        self._linger_s = linger_s
        self._spool = spool
        self._replay = replay
        self._cond = threading.Condition()
        self._items: deque = deque()
        self._reserved = 0  # records given room, being spooled, not yet in _items
        self._bytes = 0  # payload of records accepted and not yet written (queued, reserved or being written)
        self._unfinished = 1  # queued + being written (+ 1 until the replay is done)
        self._hurry = 0  # flush()/close() callers waiting: no lingering
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # prediction ids accepted but not yet committed
        self.dropped = 0
        self.failed = 0
        self.written = 0
        self.replayed = 0
        self.db_error: str | None = None  # set while the database is unavailable (health)
        self.last_drop: float | None = None  # time.monotonic() of the latest drop (health)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, record, key: str | None = None, size: int = 0) -> bool:
        """Queue a record whose payload is ``size`` bytes; False if it had to be dropped (module docstring)."""
        if self._closed:
            raise RuntimeError("the review writer is closed")
        if key is not None:
            with self._lock:
                self._pending.add(key)
        with self._cond:
            deadline = time.monotonic() + self._block_s
            while not self._has_room(size):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._drop(key)
                self._cond.notify_all()  # make sure the writer is draining
                self._cond.wait(remaining)
            self._reserved += 1
            self._bytes += size
            self._unfinished += 1
        segment = None
        try:
            if self._spool is not None:
                segment = self._spool.append(*record.spooled())
        finally:
            with self._cond:
                self._reserved -= 1
                self._items.append((record, key, size, segment))
                if len(self._items) >= self._batch_max:
                    self._cond.notify_all()
        return True

    def _has_room(self, size: int) -> bool:
        if len(self._items) + self._reserved >= self._maxsize:
            return False
        return self._bytes == 0 or self._bytes + size <= self._max_bytes

    def _drop(self, key: str | None) -> bool:
        with self._lock:
            self.dropped += 1
            self.last_drop = time.monotonic()
            self._pending.discard(key)
        log.error("review log queue full for %.1f s: record %s dropped (database too slow or down?)",
                  self._block_s, key)
        return False

    def is_pending(self, key: str) -> bool:
        with self._lock:
            return key in self._pending

    def backlog(self) -> int:
        with self._cond:
            return len(self._items)

    def backlog_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def flush(self) -> None:
        """Block until everything submitted so far is written (or given up on)."""
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                while self._unfinished:
                    self._cond.wait()
            finally:
                self._hurry -= 1

    def close(self, timeout: float | None = 60.0) -> None:
        if self._closed:
            return
        with self._cond:
            self._closed = True  # the writer drains what is queued, then stops
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("review writer did not finish within %s s; %d records not written", timeout, self.backlog())

    def _run(self) -> None:
        self._replay_all()
        while True:
            with self._cond:
                if len(self._items) < self._batch_max and not (self._closed or self._hurry):
                    self._cond.wait(self._linger_s)
                batch = [self._items.popleft() for _ in range(min(len(self._items), self._batch_max))]
                stop = self._closed and not self._items and not batch and not self._reserved
                self._cond.notify_all()  # room for callers blocked on a full queue
            if batch:
                self._write(batch)
                if self._spool is not None:
                    self._spool.done([segment for *_, segment in batch])
                with self._cond:
                    self._unfinished -= len(batch)
                    self._bytes -= sum(size for _, _, size, _ in batch)
                    self._cond.notify_all()
            if self._spool is not None:
                self._spool.sync(force=stop)
            if stop:
                return

    def _replay_all(self) -> None:
        try:
            for records in self._replay:
                self._write([(rec, None, 0, None) for rec in records])
                self.replayed += len(records)
        except Exception:  # an unreadable spool must not stop the writer: what was not replayed stays on disk
            log.exception("review writer: replaying the spool of a previous process failed")
        finally:
            with self._cond:
                self._unfinished -= 1
                self._cond.notify_all()

    def _write(self, work: list) -> None:
        records = [rec for rec, *_ in work]
        try:
            self._retry(records)
        except Exception:  # not a transient database error: find the bad record(s)
            log.exception("review writer: batch of %d failed; retrying one record at a time", len(records))
            for rec in records:
                try:
                    self._retry([rec])
                except Exception:
                    log.exception("review writer: record %r could not be written and is dropped", rec)
                    with self._lock:
                        self.failed += 1
                else:
                    self.written += 1
        else:
            self.written += len(records)
        with self._lock:
            for _, key, *_ in work:
                self._pending.discard(key)

    def _retry(self, records: list) -> None:
        delay = 0.05
        while True:
            try:
                self._write_batch(records)
                self.db_error = None
                return
            except OperationalError as exc:
                if self.db_error is None:
                    log.warning("review writer: database unavailable, retrying", exc_info=True)
                self.db_error = f"{type(exc.orig or exc).__name__}: {str(exc.orig or exc).splitlines()[0]}"
                if self._spool is not None:
                    self._spool.sync()  # the backlog grows meanwhile: keep it crash-safe
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
