"""Cross-request batching: the predictions waiting at any moment, from REST and Gradio alike, run as few batches.

Every caller of ``Pipeline.predict`` prepares its own images in its own thread (resize, scale: numpy and PIL,
in parallel) and queues the prepared batch here. There is no model thread: a caller that finds a free lane and
waiting work takes a share of the queue, runs it as one forward pass, hands every caller its rows, and loops
until its own rows are in (a "leader/follower" queue: no thread to start, stop or leak per pipeline).

How many run at once, and on how many threads (``ThreadPlan``, model/predictor.py):

* **alone**: the only prediction in flight (a caller still preparing its images counts), and none other was
  for ``calm_s`` (1 s; one person, a sequential client, an idle server): it runs on the session with every core
  (``LOUPE_INTRA_OP_THREADS``), and holds every lane meanwhile, so nothing piles onto its threads. The calm
  window keeps a loaded server from flickering into it whenever its queue happens to hold one job (under 8
  clients ~10 % of the batches did, each stalling the other lane and the requests' own threads: measured
  2.53x the baseline's throughput with that, 2.93x with lanes only, same run). This is what gets one request under ``learn.predict``'s time,
  which uses every core for one image too (resnet34 @224: ORT forward 38 ms at 2 threads, 66 ms at 1).
* **under load**: the waiting jobs are split evenly over the free lanes (``LOUPE_MODEL_WORKERS``, one per core
  by default), each lane running its share as one batch on a session of ``threads // lanes`` threads. Lanes
  of one thread waste nothing on hand-overs between threads, which a busy box makes long; the cores not
  running a forward pass serve HTTP, decoding and the prediction log meanwhile.

Measured on the 2-core box (bench/README.md, "Threads and batching"): under 8 clients, 1-thread lanes use less
server CPU per request than one session on every core; a 1-thread forward costs the same CPU per image at
any batch size (resnet18: 34 ms at batch 1 to 16), so a lane starts as soon as work waits, never waiting for
a batch to fill; batching pays where threads must meet (a multi-thread lane, LOUPE_MODEL_WORKERS=1) and
costs nothing elsewhere. Rejected: one session with every core for every batch (more CPU per request under
load, measured); a fixed wait to fill batches (adds that wait to an idle request and saves no CPU); a model
thread (one more hop per request; callers run the batches instead).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np


class _Job:
    __slots__ = ("model", "batch", "probs", "features", "error", "done")

    def __init__(self, model, batch: np.ndarray):
        self.model, self.batch = model, batch
        self.probs = self.features = self.error = None
        self.done = False

    def fits(self, other: _Job) -> bool:
        return self.model is other.model and self.batch.shape[1:] == other.batch.shape[1:]


class Batcher:
    def __init__(self, lanes: int = 1, max_batch: int = 8, calm_s: float = 1.0):
        if lanes < 1 or max_batch < 1:
            raise ValueError("lanes and max_batch must be >= 1")
        self.lanes = lanes
        self.max_batch = max_batch
        self.calm_s = calm_s
        self._crowded_at = -float("inf")  # when two or more predictions were last in flight at once
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._busy = 0  # lanes in use; a batch run alone holds all of them
        self._callers = 0  # predictions in flight here, from before their prepare() to their answer

    def predict(self, model, images: Sequence) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, features or None) for ``images``, computed in a batch with whatever else is waiting."""
        if not hasattr(model, "prepare"):  # a stand-in predictor (tests): answers directly, no features
            return np.asarray(model.predict_probs(images)), None
        with self.entered():
            return self.run(model, [model.prepare(images)])[0]

    @contextmanager
    def entered(self) -> Iterator[None]:
        """A prediction in flight, from before its images are decoded and prepared to its answer: while any other
        is, a batch does not run alone (it would hold every lane)."""
        with self._cond:
            self._callers += 1
            if self._callers > 1:
                self._crowded_at = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._callers -= 1

    def run(self, model, batches: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(probabilities, features or None) per prepared batch, each run with whatever else is waiting. The caller
        is inside ``entered()``."""
        jobs = [_Job(model, batch) for batch in batches]
        with self._cond:
            self._pending.extend(jobs)
        while True:
            with self._cond:
                while not all(j.done for j in jobs) and not (self._pending and self._busy < self.lanes):
                    self._cond.wait()
                if all(j.done for j in jobs):
                    break
                taken, alone = self._take()
            self._run(taken, alone)
        for job in jobs:
            if job.error is not None:
                raise job.error
        return [(job.probs, job.features) for job in jobs]

    def _take(self) -> tuple[list[_Job], bool]:
        """Called under the lock with work waiting and a lane free: this caller's share of the queue."""
        # Alone: nothing runs beside it (one lane, or the only prediction in flight, and calm lately): every thread.
        alone = self._busy == 0 and (self.lanes == 1 or (len(self._pending) == 1 and self._callers == 1
                                                         and time.monotonic() - self._crowded_at >= self.calm_s))
        share = -(-len(self._pending) // (self.lanes - self._busy))  # an even split over the free lanes
        first = self._pending.popleft()
        jobs, size, skipped = [first], len(first.batch), deque()
        while self._pending and len(jobs) < share:
            job = self._pending.popleft()
            if job.fits(first) and size + len(job.batch) <= self.max_batch:
                jobs.append(job)
                size += len(job.batch)
            else:
                skipped.append(job)  # another model, another input size, or no room: next batch
        self._pending.extendleft(reversed(skipped))
        self._busy += self.lanes if alone else 1
        return jobs, alone

    def _run(self, jobs: list[_Job], alone: bool) -> None:
        try:
            batch = jobs[0].batch if len(jobs) == 1 else np.concatenate([j.batch for j in jobs])
            probs, features = jobs[0].model.run(batch, alone=alone)
            start = 0
            for job in jobs:
                end = start + len(job.batch)
                job.probs = probs[start:end]
                job.features = None if features is None else features[start:end]
                start = end
        except Exception as e:  # noqa: BLE001 - every caller in the batch gets the model's error, re-raised
            for job in jobs:
                job.error = e
        finally:
            with self._cond:
                self._busy -= self.lanes if alone else 1
                for job in jobs:
                    if job.probs is None and job.error is None:
                        job.error = RuntimeError("the batch was interrupted")
                    job.done = True
                self._cond.notify_all()
