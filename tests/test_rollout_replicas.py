"""Replicas on one PostgreSQL: two real ``python app.py`` processes, each with its own data dir, one shared model
store (LOUPE_MODELS_DIR). The current version is a database row; a change made elsewhere (here: this test process,
as the CLI would) reaches both within the stated bound: LOUPE_ROLLOUT_POLL_S, the candidate being loaded while it
ran in shadow and the previous current staying loaded for a rollback."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from model import rollout, versions
from model.loading import ModelSource, load_predictor
from review.store import ReviewStore
from tests import review_fixtures as rf
from tests.browser_support import start_app

pytestmark = pytest.mark.slow
POLL_S = 1.0
MARGIN_S = 3.0  # HTTP polling, a busy 2-core box, the database round trip


def served(app) -> dict:
    return httpx.get(app.url + "/api/v1/model", timeout=10).json()["routes"]


def converge(apps, want: dict, timeout: float) -> list[float]:
    """Seconds until each app serves ``want`` (polled every 50 ms)."""
    start = time.monotonic()
    times: list[float | None] = [None] * len(apps)
    while None in times:
        for i, app in enumerate(apps):
            if times[i] is None and served(app) == want:
                times[i] = time.monotonic() - start
        assert time.monotonic() - start < timeout, f"not converged on {want}: {[served(a) for a in apps]}"
        time.sleep(0.05)
    return times


def test_two_replicas_follow_the_registry_within_the_poll_interval(tmp_path, exported, demo_settings,
                                                                   demo_predictor):
    url, drop = rf._pg_database(rf.pg_admin_url())
    shared = tmp_path / "models"
    path, sha = exported("pad224")
    (shared / sha).mkdir(parents=True)
    shutil.copyfile(path, shared / sha / "export.pkl")
    env = {"LOUPE_DATABASE_URL": url, "LOUPE_MODELS_DIR": str(shared), "LOUPE_ROLLOUT_POLL_S": str(POLL_S),
           "LOUPE_AUDIT_RATE": "0"}
    # Both serving bundles converted once, here: the replicas start and take the candidate without converting
    # (the test is about following the registry, not about conversion time).
    prep = rf.make_settings(tmp_path / "prep", "sqlite://")
    shutil.copytree(demo_settings.cache_dir, prep.cache_dir)
    load_predictor(prep, ModelSource(path, sha, "pads"))
    apps, store = [], None
    try:
        dirs = [tmp_path / name / "data" for name in ("replica-1", "replica-2")]
        for data in dirs:
            shutil.copytree(prep.cache_dir, data / "cache")
        with ThreadPoolExecutor(2) as pool:
            starting = [pool.submit(start_app, d, env) for d in dirs]
        # every started app goes into ``apps`` (and is stopped below) even if the other failed to start
        apps = [f.result() for f in starting if f.exception() is None]
        for f in starting:
            if f.exception() is not None:
                raise f.exception()
        settings = rf.make_settings(tmp_path / "cli", url, models_dir=shared)
        store = ReviewStore(settings)
        demo = demo_predictor.info.version
        assert [served(a) for a in apps] == [{"current": demo}] * 2  # the first replica adopted the demo
        # Registered with a path that exists on no replica: each finds the file in the shared store by its sha256.
        cand = store.transaction(lambda s: versions.register(s, name="pads", sha256=sha, now=store.clock(),
                                                             path="models/somewhere-else/export.pkl",
                                                             vocab=("blue", "green", "red")))
        rollout.start_shadow(store, cand.version, actor="alice")
        converge(apps, {"current": demo, "shadow": cand.version}, timeout=120)

        def load(record):
            return demo_predictor  # the gate has no items to score here; it is tested elsewhere

        rollout.promote(store, settings, cand.version, actor="alice", confirmed=True, load=load,
                        override="replica test: the gate is tested elsewhere")
        promoted = converge(apps, {"current": cand.version}, timeout=60)
        rollout.rollback(store, actor="alice")
        rolled_back = converge(apps, {"current": demo}, timeout=60)
        print(f"\nreplicas converged (poll {POLL_S:g} s): promote {max(promoted):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in promoted)}), rollback {max(rolled_back):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in rolled_back)})")
        assert max(promoted) <= POLL_S + MARGIN_S and max(rolled_back) <= POLL_S + MARGIN_S
        # and both replicas answer with what they serve
        for app in apps:
            r = httpx.post(app.url + "/api/v1/predict", files={"file": ("x.png", _png(), "image/png")}, timeout=60)
            assert r.status_code == 200 and r.json()["model"]["version"] == demo
    finally:
        for app in apps:
            app.stop()
        if store is not None:
            store.close()
        drop()


def _png() -> bytes:
    from model.demo import DEMO_EXAMPLES_DIR

    return sorted(DEMO_EXAMPLES_DIR.glob("*.png"))[0].read_bytes()
