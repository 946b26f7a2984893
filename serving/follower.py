"""Serve what the model registry says, in every replica.

The registry (model.versions, in the shared database) says which version is current and which candidate runs in
shadow or canary, with what share. ``RegistryFollower.sync`` reads that and makes this process's router match:
models it has not loaded yet are loaded FIRST (pinned sha256; converting a new export can take seconds), then the
whole routing snapshot is swapped at once (serving.router), so requests never wait for a load and in-flight
requests finish on the model they started with. A background thread calls ``sync`` every ``LOUPE_ROLLOUT_POLL_S``;
a rollout action taken in this process calls it at once (``router.refresh()``).

Convergence: every replica serves a change within ``rollout_poll_s`` plus the load time of a model it has not
loaded yet. A promotion needs no load (the candidate was loaded while it ran in shadow or canary) and neither does
a rollback (the previous current stays loaded), so both converge within one poll.

A version that fails to load is logged as an error and left out: a candidate is not served; a new current is not
switched to (the replica keeps serving the model it has and retries every ``RETRY_S``), and the Models tab shows it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from model import versions
from model.loading import ModelLoadError
from model.rollout import canary_share
from serving.router import ModelRouter, Routes

log = logging.getLogger(__name__)

RETRY_S = 60.0  # a version that failed to load is tried again after this long, not at every poll


@dataclass(frozen=True)
class Wanted:
    current: versions.VersionRecord | None
    candidate: versions.VersionRecord | None  # in shadow or canary
    share: float  # canary share


def wanted(session, default_share: float) -> Wanted:
    cand = versions.in_role(session)
    share = canary_share(session, cand.version, default_share) if cand and cand.status == "canary" else 0.0
    return Wanted(versions.current(session), cand, share)


def _key(routes: Routes) -> tuple:
    cand = routes.candidate.info.sha256 if routes.candidate is not None else None
    return routes.current.info.sha256, cand, routes.role, routes.canary_share


class RegistryFollower:
    def __init__(self, store, router: ModelRouter, settings, *, load=None):
        self.store = store
        self.router = router
        self.settings = settings
        self._load = load or (lambda rec: versions.load_predictor(rec, settings))
        routes = router.routes()
        self._loaded = {p.info.sha256: p for p in (routes.current, routes.candidate) if p is not None}
        self._previous = None  # the current model before the last switch: kept loaded for an instant rollback
        self._failed: dict[str, tuple[float, str]] = {}  # sha256 -> (monotonic time, message) of a failed load
        self._lock = threading.Lock()  # one sync at a time (the poller and a rollout action may both call it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.synced_at: float | None = None
        self.error: str | None = None
        router.set_refresher(self.sync, self.status)

    def status(self) -> dict:
        return {"poll_s": self.settings.rollout_poll_s, "error": self.error,
                "seconds_since_sync": None if self.synced_at is None else round(time.monotonic() - self.synced_at, 1),
                "failed_loads": {sha[:12]: msg for sha, (_, msg) in self._failed.items()}}

    def sync(self) -> Routes:
        """Make the router serve what the registry says now; returns the routes served afterwards."""
        with self._lock:
            try:
                want = self.store.transaction(lambda s: wanted(s, self.settings.canary_share), read=True)
            except SQLAlchemyError as e:
                self.error = f"cannot read the registry: {type(e).__name__}"
                log.error("registry follower: %s (still serving %s)", self.error, self.router.current.info.version)
                return self.router.routes()
            old = self.router.routes()
            problems = []
            current = old.current
            if want.current is not None and want.current.sha256 != current.info.sha256:
                loaded = self._get(want.current)
                if loaded is None:
                    problems.append(f"cannot serve the current version {want.current.version}")
                else:
                    current = loaded
            candidate = None
            if want.candidate is not None and want.candidate.sha256 != current.info.sha256:
                candidate = self._get(want.candidate)
                if candidate is None:
                    problems.append(f"cannot load the {want.candidate.status} {want.candidate.version}")
            role = want.candidate.status if candidate is not None else None
            new = Routes(current, candidate, role, want.share if role == "canary" else 0.0)
            if _key(new) != _key(old):
                self.router.set_routes(new)
                log.info("serving %s", new.versions() | ({"canary_share": new.canary_share} if role == "canary"
                                                         else {}))
            if current is not old.current:
                self._previous = old.current
            self._evict(keep=[current, candidate, self._previous])
            self.error = "; ".join(problems) or None
            self.synced_at = time.monotonic()
            return self.router.routes()

    def _get(self, record):
        if record.sha256 in self._loaded:
            return self._loaded[record.sha256]
        failed = self._failed.get(record.sha256)
        if failed is not None and time.monotonic() - failed[0] < RETRY_S:
            return None
        try:
            predictor = self._load(record)
            self.store.register_model(predictor.info)  # so its answers (canary) can be logged in its own vocab
        except (ModelLoadError, OSError, SQLAlchemyError) as e:
            msg = e.args[0] if e.args else type(e).__name__
            self._failed[record.sha256] = (time.monotonic(), str(msg)[:500])
            log.error("registry follower: cannot load %s: %s", record.version, msg)
            return None
        self._failed.pop(record.sha256, None)
        self._loaded[record.sha256] = predictor
        return predictor

    def _evict(self, keep: list) -> None:
        """Keep the models served now and the previous current (an instant rollback); drop the rest."""
        shas = {p.info.sha256 for p in keep if p is not None}
        for sha in [s for s in self._loaded if s not in shas]:
            del self._loaded[sha]

    # --- the poller ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="registry-follower", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:  # the first sync at once: a candidate already in shadow or canary is loaded right after start
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the poller must outlive any one failure; it is logged
                log.exception("registry follower: sync failed")
            if self._stop.wait(self.settings.rollout_poll_s):
                return


# --- start-up ----------------------------------------------------------------------------------------------------
def startup_predictor(settings, store):
    """What this replica serves first: the registry's current version (pinned load), or, on a fresh registry, the
    settings' model (``adopt`` then makes it current)."""
    from model.loading import load_predictor

    rec = store.transaction(versions.current, read=True)
    if rec is None:
        return load_predictor(settings)
    try:
        return versions.load_predictor(rec, settings)
    except ModelLoadError as e:
        raise ModelLoadError(
            f"the registry's current version {rec.version} cannot be loaded here: {e.args[0]} Every replica must "
            f"reach the registered model files (LOUPE_MODELS_DIR, now {settings.model_store_dir}); or roll back "
            "with: python -m model.versions rollback") from None


def adopt(store, settings, predictor) -> None:
    """A fresh registry adopts the settings' model as current; a registry that serves something else gets the
    settings' model as a candidate (so a changed LOUPE_MODEL_PATH is visible in the Models tab, not ignored)."""
    from model.loading import model_source

    src = model_source(settings)
    info = predictor.info
    if not src.sha256_pin or info.sha256 != src.sha256_pin.strip().lower():
        return  # not the settings' model (tests, or the registry's current version): nothing to adopt
    rec = store.transaction(lambda s: versions.adopt_served(s, name=info.name, sha256=info.sha256,
                                                           path=src.path.resolve(), vocab=info.vocab,
                                                           now=store.clock()))
    if rec.status != "current":
        log.warning("the settings' model %s is %s in the registry, which serves another version: roll it out from "
                    "the Models tab or python -m model.versions", rec.version, rec.status)


def register_settings_model(settings, store) -> None:
    """When the registry serves another version than the settings name, register the settings' model (loading it:
    its classes are needed) as a candidate, unless it is registered already."""
    from model.loading import load_predictor, model_source

    src = model_source(settings)
    pin = (src.sha256_pin or "").strip().lower()
    if not pin or store.transaction(lambda s: versions.by_sha256(s, pin), read=True) is not None:
        return
    try:
        adopt(store, settings, load_predictor(settings))
    except ModelLoadError as e:
        log.error("the settings' model was not registered: %s", e.args[0])
