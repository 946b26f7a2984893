"""The unfamiliar-input detector of each model version, for the request path (model/unfamiliar.py scores).

A detector belongs to a model version (the router swaps versions; a canary and the current model each answer with
their own), so it is looked up by the answering model's sha256, in the same reference files the drift monitor reads
(review.monitor.References: ``<data dir>/models/<sha256>/reference.json``, or the demo's own). Loaded once per
version, on its first answer; the request path then reads a dict. ``refresh()`` (called by the background monitor
every cycle, never by a request) re-reads a file that changed, e.g. after ``python -m model.calibrate``.
"""

from __future__ import annotations

import logging
import threading

from model.unfamiliar import NAME, Detector

log = logging.getLogger(__name__)


class Detectors:
    def __init__(self, references):
        self.references = references  # review.monitor.References (shared with the monitor: one cache of files)
        self._by_sha: dict[str, tuple[object, Detector | None]] = {}  # sha256 -> (the Reference read, its detector)
        self._lock = threading.Lock()

    def __call__(self, info) -> Detector | None:
        hit = self._by_sha.get(info.sha256)
        if hit is not None:
            return hit[1]
        return self._load(info.sha256)

    def _load(self, sha256: str) -> Detector | None:
        reference, why = self.references.get(sha256)
        detector = Detector.from_section(reference.section(NAME)) if reference is not None else None
        with self._lock:
            old = self._by_sha.get(sha256)
            self._by_sha[sha256] = (reference, detector)
        if old is None or old[0] is not reference:
            if detector is not None:
                log.info("unfamiliar inputs: flagging for model %s… (threshold %.1f)", sha256[:12],
                         detector.threshold)
            else:
                log.info("unfamiliar inputs are not flagged for model %s…: %s", sha256[:12],
                         why or "its reference has no unfamiliar-input detector (run python -m model.calibrate)")
        return detector

    def refresh(self) -> None:
        """Re-read the reference of every version seen so far if its file changed (References checks mtimes)."""
        for sha256 in list(self._by_sha):
            reference, _ = self.references.get(sha256)
            if reference is not self._by_sha[sha256][0]:
                self._load(sha256)
