"""Cross-request batching: the predictions waiting at any moment, from REST and Gradio alike, run as few batches.

Every caller of ``Pipeline.predict`` prepares its own images in its own thread (resize, scale: numpy and PIL,
in parallel) and queues the prepared batch here. There is no model thread: a caller that finds a free lane and
waiting work takes a share of the queue, runs it as one forward pass, hands every caller its rows, and loops
until its own rows are in (a "leader/follower" queue: no thread to start, stop or leak per pipeline).

How many run at once, and on how many threads (``ThreadPlan``, model/predictor.py):

* **alone**: nothing else running, one job waiting (one person, an idle machine): it runs on the session with
  every core (``LOUPE_INTRA_OP_THREADS``), and holds every lane meanwhile, so nothing piles onto its threads.
  This is what gets a single request under ``learn.predict``'s time: fastai uses all cores for one image.
* **under load**: the waiting jobs are split evenly over the free lanes (``LOUPE_MODEL_WORKERS``, one per core
  by default), each lane running its share as one batch on a session of ``threads // lanes`` threads. Batches
  on 1-thread sessions side by side beat one 2-thread session on the same work (bench/README.md, "Threads and
  batching": no barrier waits between threads, which a busy box makes long), and batching itself adds ~1.2x
  at 224 px.

Rejected: one model thread with every core for every batch (slower under load, measured); a fixed wait to let
batches fill (adds that wait to every idle request; under load the queue fills by itself while lanes are
busy); a session per lane (twice the memory for nothing: ORT runs one session from several threads).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

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
    def __init__(self, lanes: int = 1, max_batch: int = 8):
        if lanes < 1 or max_batch < 1:
            raise ValueError("lanes and max_batch must be >= 1")
        self.lanes = lanes
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._busy = 0  # lanes in use; a batch run alone holds all of them

    def predict(self, model, images: Sequence) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, features or None) for ``images``, computed in a batch with whatever else is waiting."""
        if not hasattr(model, "prepare"):  # a stand-in predictor (tests): answers directly, no features
            return np.asarray(model.predict_probs(images)), None
        job = _Job(model, model.prepare(images))
        with self._cond:
            self._pending.append(job)
        while True:
            with self._cond:
                while not job.done and not (self._pending and self._busy < self.lanes):
                    self._cond.wait()
                if job.done:
                    break
                jobs, alone = self._take()
            self._run(jobs, alone)
        if job.error is not None:
            raise job.error
        return job.probs, job.features

    def _take(self) -> tuple[list[_Job], bool]:
        """Called under the lock with work waiting and a lane free: this caller's share of the queue."""
        # Alone: nothing runs beside it (one lane, or one job waiting on an idle batcher): every thread.
        alone = self._busy == 0 and (self.lanes == 1 or len(self._pending) == 1)
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
