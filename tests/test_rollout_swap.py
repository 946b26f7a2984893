"""No failures during a swap: 8 REST clients keep predicting through a real server (uvicorn on a free port, the real
build_server) while the candidate goes to shadow, canary, is promoted, rolled back, promoted and rolled back again,
each step through model.rollout and the registry follower, as the Models tab does it.

Every request must succeed, both versions must answer, and every answer must be wholly one version's: its version,
its classes and exactly the probabilities that version gives for that image.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from app import assemble
from model import rollout, versions
from model.demo import DEMO_EXAMPLES_DIR
from serving.imageio import decode_image
from tests import review_fixtures as rf
from tests.app_support import serving

pytestmark = pytest.mark.slow
CLIENTS = 8
TOL = 1e-5


def test_promote_and_rollback_under_eight_clients_fail_nothing(tmp_path, exported, demo_predictor):
    path, sha = exported("pad224")
    settings = rf.make_settings(tmp_path, f"sqlite:///{tmp_path / 'loupe.db'}", gate_min_shadowed=0)
    parts = assemble(settings, demo_predictor, rescore=False, watch=False)
    store, router = parts.store, parts.router
    demo_version = demo_predictor.info.version
    cand = store.transaction(lambda s: versions.register(s, name="pads", sha256=sha, path=path, now=store.clock(),
                                                         vocab=("blue", "green", "red")))
    images = [p.read_bytes() for p in sorted(DEMO_EXAMPLES_DIR.glob("*.png"))[:2]]
    results: list[tuple[int, int, str, dict | str]] = []  # (client, image index, session, status, body)
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            k = 0
            while not stop.is_set():
                img = k % len(images)
                session = f"client-{i}-{k // 4}"  # a new browser session every 4 requests
                try:
                    r = http.post("/api/v1/predict", files={"file": ("d.png", images[img], "image/png")},
                                  headers={"X-Loupe-Session": session})
                    row = (i, img, session, r.status_code, r.json() if r.status_code == 200 else r.text)
                except httpx.HTTPError as e:  # a dropped connection is a failure too
                    row = (i, img, session, -1, repr(e))
                with lock:
                    results.append(row)
                k += 1

    def progress(n: int = 3 * CLIENTS) -> None:
        """Let the clients make ``n`` more requests on the routes just set."""
        with lock:
            target = len(results) + n
        deadline = time.monotonic() + 120
        while len(results) < target:
            assert time.monotonic() < deadline, "the clients stopped making progress"
            time.sleep(0.02)

    load = rollout.loader(settings, router)
    steps = [
        ("shadow", lambda: rollout.start_shadow(store, cand.version, actor="alice")),
        ("canary", lambda: rollout.start_canary(store, cand.version, share=0.5, actor="alice")),
        ("promote", lambda: rollout.promote(store, settings, cand.version, actor="alice", confirmed=True, load=load,
                                            override="swap test: the gate is tested elsewhere")),
        ("rollback", lambda: rollout.rollback(store, actor="alice")),
        ("promote", lambda: rollout.promote(store, settings, cand.version, actor="alice", confirmed=True, load=load,
                                            override="swap test again")),
        ("rollback", lambda: rollout.rollback(store, actor="alice")),
    ]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    served: list[dict] = []
    try:
        with serving(settings, parts) as base:
            try:
                for t in threads:
                    t.start()
                progress()
                for _, step in steps:
                    step()
                    served.append(router.refresh().versions())  # this replica follows at once (loads, then swaps)
                    progress()
                candidate = load(cand)  # the loaded candidate, for the expected answers
            finally:
                stop.set()
                for t in threads:
                    t.join(60)
    finally:
        parts.shadow.close()
        store.close()

    assert served[2] == {"current": cand.version} and served[-1] == {"current": demo_version}
    failures = [r for r in results if r[3] != 200]
    by_version = Counter(r[4]["model"]["version"] for r in results if r[3] == 200)
    print(f"\nswap test: {len(results)} requests from {CLIENTS} clients, {len(failures)} failed, answered by "
          f"{dict(by_version)}")
    assert failures == []
    assert set(by_version) == {demo_version, cand.version}
    decode = dict(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    expected = {m.info.version: [m.predict_probs([decode_image(b, **decode)])[0] for b in images]
                for m in (demo_predictor, candidate)}
    vocabs = {demo_version: list(demo_predictor.info.vocab), cand.version: list(candidate.info.vocab)}
    for _, img, _, _, body in results:
        version = body["model"]["version"]
        probs = body["probabilities"]
        # wholly one version's answer: its classes, its probabilities for this very image, its top class
        assert list(probs) == vocabs[version]
        np.testing.assert_allclose(list(probs.values()), expected[version][img], atol=TOL)
        assert body["label"] == vocabs[version][int(np.argmax(expected[version][img]))]
