"""The background monitor: drift alarms and the gauges /metrics shows, recomputed every few seconds.

Every ``monitor_every_s`` seconds, for each model version the router serves (current, and a shadow or canary
candidate): read its drift window from the database (its latest ``drift_window`` traffic predictions, within
``drift_window_minutes`` if set; from the database, so every replica computes the same), compare it with the
version's reference (model/reference.py) using review/drift.py, and publish the result:

* ``status()`` / ``health()``: an immutable snapshot, read by /healthz and the Monitor tab without any query;
* one log line per alarm change (raised or cleared), never one per check or per request;
* the gauges of serving/metrics.py (drift scores, window size, unfamiliar rate, open queue items by reason).

Cost per cycle: one indexed query per version (ix_predictions_model_created: the latest N rows, not a scan of the
log) and five counts on the queue's partial indexes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from model.reference import Reference, ReferenceError, find_reference, load_reference
from review import drift
from review.db import Prediction, utcnow
from review.queue import open_counts

log = logging.getLogger(__name__)
TRAFFIC = ("upload", "webcam", "sketch", "stream", "api")  # not "dataset" or "rescore": those are not traffic
P = Prediction


def unfamiliar_column():
    """The unfamiliar-input flag's column (boolean, NULL unknown), once the detector adds it to predictions."""
    return getattr(P, "unfamiliar", None)


def window_query(*conds, size: int):
    """The latest ``size`` predictions matching ``conds``, newest first, as drift.Window columns."""
    cols = [P.predicted, P.confidence, P.width, P.height, P.brightness, P.saturation]
    if (flag := unfamiliar_column()) is not None:
        cols.append(flag.label("unfamiliar"))
    return select(*cols).where(*conds).order_by(P.created.desc()).limit(size)


def read_window(session: Session, query) -> drift.Window:
    # Core rows through the connection, columns by zip: at 100k rows the ORM's per-row work cost ~1 s more
    result = session.connection().execute(query)
    names = list(result.keys())
    rows = result.all()
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    return drift.Window.from_columns(dict(zip(names, columns, strict=True)))


def fetch_window(session: Session, version: str, *, size: int, since: datetime | None = None) -> drift.Window:
    conds = [P.model_version == version, P.source.in_(TRAFFIC)]
    if since is not None:
        conds.append(P.created >= since)
    return read_window(session, window_query(*conds, size=size))


class References:
    """Reference files by export sha256, re-read when the file changes (a calibrate run while the app serves)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._cache: dict[str, tuple[Path, float, Reference | None, str]] = {}
        self._lock = threading.Lock()

    def get(self, sha256: str) -> tuple[Reference | None, str]:
        """(reference or None, why not)."""
        path = find_reference(self.data_dir, sha256)
        if path is None:
            return None, ("no reference data for this model: run python -m model.calibrate <folder|labels.csv> "
                          f"(it writes {self.data_dir / 'models' / sha256 / 'reference.json'})")
        try:
            mtime = path.stat().st_mtime
        except OSError as e:
            return None, f"cannot read {path}: {e.strerror or e}"
        with self._lock:
            hit = self._cache.get(sha256)
            if hit is not None and hit[0] == path and hit[1] == mtime:
                return hit[2], hit[3]
        try:
            ref, why = load_reference(path, expect_sha256=sha256), ""
        except ReferenceError as e:
            ref, why = None, e.args[0]
            log.error("drift alarms are off for this model: %s", why)
        with self._lock:
            self._cache[sha256] = (path, mtime, ref, why)
        return ref, why


@dataclass(frozen=True)
class VersionDrift:
    version: str
    role: str  # current | shadow | canary
    status: str  # ok | drifting | insufficient_data | no_reference
    n: int
    checks: tuple[drift.Check, ...]
    unfamiliar_rate: float | None
    note: str = ""

    @property
    def alarms(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks if c.status == drift.DRIFT)

    def as_dict(self) -> dict:
        out = {"role": self.role, "status": self.status, "window": self.n, "alarms": list(self.alarms),
               "checks": {c.name: c.as_dict() for c in self.checks}}
        if self.unfamiliar_rate is not None:
            out["unfamiliar_rate"] = round(self.unfamiliar_rate, 4)
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class DriftStatus:
    checked: datetime | None  # None: no check has finished yet
    versions: tuple[VersionDrift, ...] = ()
    error: str | None = None  # why the latest check failed (the previous result is kept)

    @property
    def status(self) -> str:
        if self.checked is None:
            return "starting"
        statuses = {v.status for v in self.versions}
        for s in ("drifting", "ok", "insufficient_data", "no_reference"):
            if s in statuses:
                return s
        return "no_reference"

    def as_dict(self) -> dict:
        out = {"status": self.status, "checked": self.checked.isoformat(timespec="seconds") if self.checked else None,
               "models": {v.version: v.as_dict() for v in self.versions}}
        if self.error:
            out["error"] = self.error
        return out


def version_drift(reference: Reference | None, why: str, window: drift.Window, th: drift.Thresholds, *,
                  version: str, role: str) -> VersionDrift:
    rate = drift.unfamiliar_rate(window)
    if reference is None:
        return VersionDrift(version, role, "no_reference", len(window), (), rate, why)
    checks = tuple(drift.compare(reference, window, th))
    if any(c.status == drift.DRIFT for c in checks):
        status = "drifting"
    elif len(window) < th.min_window:
        status = "insufficient_data"
    else:
        status = "ok"
    return VersionDrift(version, role, status, len(window), checks, rate)


def check_version(store, settings, references: References, th: drift.Thresholds, *, version: str, sha256: str,
                  role: str, now: datetime) -> VersionDrift:
    """One version's live drift: its window from the database against its reference."""
    since = now - timedelta(minutes=settings.drift_window_minutes) if settings.drift_window_minutes else None
    reference, why = references.get(sha256)
    window = store.transaction(lambda s: fetch_window(s, version, size=settings.drift_window, since=since),
                               read=True)
    return version_drift(reference, why, window, th, version=version, role=role)


class Monitor:
    def __init__(self, settings, store, router, metrics=None, *, clock=utcnow, detectors=None):
        self.settings = settings
        self.store = store
        self.router = router
        self.metrics = metrics
        self.clock = clock
        self.thresholds = drift.Thresholds.from_settings(settings)
        # serving.unfamiliar.Detectors: the request path's detectors, re-read here (not per request) when their
        # reference file changes; they share this monitor's References (one cache of the files)
        self.detectors = detectors
        self.references = detectors.references if detectors is not None else References(settings.data_dir)
        self._status = DriftStatus(None)
        self._labelled: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()
        self._last_error: str | None = None
        if metrics is not None:
            metrics.watch(router, store)

    # --- reading (cheap: no database) --------------------------------------------------------------------------
    def status(self) -> DriftStatus:
        return self._status

    def health(self) -> dict:
        return self._status.as_dict()

    # --- checking ----------------------------------------------------------------------------------------------
    def refresh(self) -> DriftStatus:
        """One check of every serving version, now (the thread calls it; tests too)."""
        with self._refresh_lock:
            routes = self.router.routes()
            models = {"current": routes.current}
            if routes.candidate is not None and routes.role is not None:
                models[routes.role] = routes.candidate
            now = self.clock()
            results = [check_version(self.store, self.settings, self.references, self.thresholds,
                                     version=p.info.version, sha256=p.info.sha256, role=role, now=now)
                       for role, p in models.items()]
            queue = self.store.transaction(open_counts, read=True)
            if self.detectors is not None:
                self.detectors.refresh()
            new = DriftStatus(now, tuple(results))
            self._announce(self._status, new)
            self._publish(new, queue)
            self._status = new
            return new

    def _announce(self, old: DriftStatus, new: DriftStatus) -> None:
        """One log line per alarm raised or cleared."""
        before = {(v.version, c.name): c for v in old.versions for c in v.checks if c.status == drift.DRIFT}
        after = {(v.version, c.name): (v, c) for v in new.versions for c in v.checks if c.status == drift.DRIFT}
        for (version, name), (v, c) in after.items():
            if (version, name) not in before:
                log.warning("drift alarm: %s (%s) %s PSI %.3f > %.2f over its latest %d predictions; see the "
                            "Monitor tab", version, v.role, name, c.psi, c.threshold, v.n)
        still = {v.version for v in new.versions}
        for version, name in before:
            if (version, name) not in after:
                where = "back within its threshold" if version in still else "no longer serving"
                log.info("drift cleared: %s %s is %s", version, name, where)

    def _publish(self, status: DriftStatus, queue: dict[str, int]) -> None:
        m = self.metrics
        if m is None:
            return
        for reason, n in queue.items():
            m.queue_open.labels(reason).set(n)
        labelled = set()
        for v in status.versions:
            m.drift_window.labels(v.version).set(v.n)
            labelled.add((v.version, ""))
            if v.unfamiliar_rate is not None:
                m.unfamiliar_rate.labels(v.version).set(v.unfamiliar_rate)
            for c in v.checks:
                if c.psi is None:
                    continue
                m.drift_psi.labels(v.version, c.name).set(c.psi)
                m.drift_alarm.labels(v.version, c.name).set(1.0 if c.status == drift.DRIFT else 0.0)
                labelled.add((v.version, c.name))
        for version, name in self._labelled - labelled:  # a version that stopped serving: its series end
            gauges = (m.drift_window, m.unfamiliar_rate) if name == "" else (m.drift_psi, m.drift_alarm)
            for g in gauges:
                with contextlib.suppress(KeyError):  # never set (e.g. no unfamiliar rate)
                    g.remove(*((version,) if name == "" else (version, name)))
        self._labelled = labelled
        m.monitor_age.set(status.checked.timestamp())

    # --- the thread --------------------------------------------------------------------------------------------
    def start(self) -> Monitor:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loupe-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                if self._last_error is not None:
                    log.info("monitor: checks work again")
                    self._last_error = None
            except Exception as e:  # noqa: BLE001 - a database hiccup must not end the monitor; said once per kind
                text = f"{type(e).__name__}: {e}"
                if text != self._last_error:
                    log.error("monitor: the drift check failed (%s); retrying every %.0f s", text,
                              self.settings.monitor_every_s)
                self._last_error = text
                self._status = DriftStatus(self._status.checked, self._status.versions, text)
            self._stop.wait(self.settings.monitor_every_s)
