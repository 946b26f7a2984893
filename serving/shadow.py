"""Shadow scoring: a candidate in the "shadow" role scores every live request beside the current model, off the
request path. Its answers go to ``shadow_predictions`` (role "shadow", linked to the served prediction) and are never
shown to anyone but the Models tab.

Why a bounded queue and one worker: the answer must not wait for the shadow. ``submit`` never blocks (a full queue
drops the job and counts it), and one worker scores in small batches. A job holds the upload's encoded bytes, not its
decoded pixels (a 40-megapixel upload is ~120 MB of them): the worker decodes it again, off the request path, so the
queue holds at most ``maxsize`` uploads of at most max_upload_bytes each. Under load the shadow falls behind, its queue
fills and further requests are simply not shadowed: serving keeps its speed, the drop count says how much was
missed (Models tab), and the promotion gate counts only what was really scored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from review.db import ShadowPrediction

log = logging.getLogger(__name__)

BATCH = 8
_WARN_EVERY_S = 60.0  # a full queue is logged at most this often (it can happen on every request under load)


@dataclass(frozen=True)
class ShadowJob:
    prediction_id: str  # the served prediction this shadows
    data: bytes  # the upload as received (already accepted by the served path's decoder)
    served_version: str
    served_label: str


class ShadowScorer:
    def __init__(self, store, *, decode: Callable[[bytes], Image.Image], maxsize: int = 32, batch: int = BATCH):
        self.store = store
        self.decode = decode  # the served path's own decoder (serving.pipeline.Pipeline.decode_bytes)
        self.batch = batch
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._lock = threading.Lock()
        self._counts = {"submitted": 0, "scored": 0, "dropped": 0, "failed": 0}
        self._last_warning = 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def submit(self, candidate, jobs: Sequence[ShadowJob]) -> None:
        """Queue ``jobs`` for ``candidate`` (a predictor); never blocks: what does not fit is dropped and counted."""
        dropped = 0
        for job in jobs:
            try:
                self._queue.put_nowait((candidate, job))
            except queue.Full:
                dropped += 1
        with self._lock:
            self._counts["submitted"] += len(jobs)
            self._counts["dropped"] += dropped
            warn = dropped and time.monotonic() - self._last_warning > _WARN_EVERY_S
            if warn:
                self._last_warning = time.monotonic()
        if warn:
            log.warning("shadow scoring is behind: %d requests not shadowed so far (LOUPE_SHADOW_QUEUE_SIZE=%d)",
                        self._counts["dropped"], self._queue.maxsize)

    def stats(self) -> dict:
        with self._lock:
            return {**self._counts, "waiting": self._queue.qsize()}

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every submitted job is scored and stored (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                raise TimeoutError("shadow scoring did not finish in time")
            time.sleep(0.01)

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the jobs already queued (bounded wait: shadow rows are evidence, not user data)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put((None, None))  # wakes the worker; the sentinel is its last job
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            items = [first]
            while len(items) < self.batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(candidate is None for candidate, _ in items)
            work = [(c, j) for c, j in items if c is not None]
            try:
                if work:
                    self._score(work)
            except Exception:  # noqa: BLE001 - a shadow failure must never stop the worker; it is logged and counted
                log.exception("shadow scoring failed for %d requests", len(work))
                with self._lock:
                    self._counts["failed"] += len(work)
            finally:
                for _ in items:
                    self._queue.task_done()
            if stop:
                return

    def _score(self, work: list) -> None:
        groups: dict[int, tuple] = {}
        for candidate, job in work:
            groups.setdefault(id(candidate), (candidate, []))[1].append(job)
        rows = []
        now = self.store.clock()
        for candidate, jobs in groups.values():
            start = time.perf_counter()
            probs = np.asarray(candidate.predict_probs([self.decode(j.data) for j in jobs]))
            latency_ms = (time.perf_counter() - start) * 1000 / len(jobs)
            vocab = candidate.info.vocab
            for job, row in zip(jobs, probs, strict=True):
                top = int(np.argmax(row))
                rows.append({"prediction_id": job.prediction_id, "created": now, "role": "shadow",
                             "model_version": candidate.info.version, "served_version": job.served_version,
                             "served_label": job.served_label, "predicted": vocab[top],
                             "confidence": float(row[top]), "probs": [float(p) for p in row],
                             "agrees": vocab[top] == job.served_label, "latency_ms": latency_ms})
        self.store.transaction(lambda s: s.execute(ShadowPrediction.__table__.insert(), rows))
        with self._lock:
            self._counts["scored"] += len(rows)
