"""Loupe: serve a fastai image classifier (Gradio UI + REST API). ``python app.py`` (also what HF Spaces runs).

Thin on purpose: settings, logging, the model (loaded once), the review store, the server. Nothing heavy is
imported at module level, so a bad setting or model file fails fast, before Gradio's ~5 s import.
"""

from __future__ import annotations

import logging
import sys
import threading
from functools import partial
from typing import NamedTuple


def release_freed_memory() -> None:
    """Make freed image buffers go back to the OS (glibc only; elsewhere a no-op).

    glibc's mmap threshold grows with use (up to 32 MB), after which big blocks are carved from per-thread arenas
    and kept there when freed: with dozens of worker threads each decoding a 36 MB image now and then, the
    process holds hundreds of MB that nothing uses. A fixed 1 MB threshold maps big buffers directly and unmaps
    them on free, so memory use follows what is live (measured: a flood of 12-megapixel JPEGs peaked ~300 MB
    lower). Costs page faults on each big allocation: milliseconds next to decoding such an image.
    """
    import ctypes

    m_mmap_threshold = -3  # <malloc.h>
    try:
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators return memory differently
        pass


def unwritable_data_dir(settings) -> str | None:
    """Why Loupe cannot create files where it must (data dir, images, spool, bundle cache), or None."""
    import tempfile

    for folder in (settings.data_dir, settings.images_dir, settings.data_dir / "spool", settings.cache_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            return f"{folder}: {e.strerror or e}"
    return None


def main() -> None:
    release_freed_memory()
    from pydantic import ValidationError

    from settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"loupe: invalid configuration (LOUPE_* environment variables):\n{e}", file=sys.stderr)
        sys.exit(2)
    if problem := unwritable_data_dir(settings):
        # Found now, not as a traceback from whichever write comes first (or, worse, predictions answered with
        # nothing logged).
        print(f"loupe: the data directory is not writable ({problem}). Loupe keeps its database, images and model "
              "cache there: fix its permissions or free space, or set LOUPE_DATA_DIR to a writable directory.",
              file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("loupe")

    from sqlalchemy.exc import SQLAlchemyError

    from model.loading import ModelLoadError
    from review.store import ReviewStore
    from serving.follower import register_settings_model, startup_predictor
    from ui.server import build_server, serve

    try:
        store = ReviewStore(settings, spool=True)  # this process's log: spooled, and replays dead processes' spools
    except (OSError, SQLAlchemyError) as e:
        print(f"loupe: cannot open the review database or data directory: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        # The registry's current version if there is one (every replica serves the same), else the settings' model.
        predictor = startup_predictor(settings, store)
    except ModelLoadError as e:
        # The message names the file and what to do; a traceback would only bury it.
        print(f"loupe: {e}", file=sys.stderr)
        store.close()
        sys.exit(2)
    info = predictor.info
    log.info("serving %s (%s, %d classes)%s", info.version, info.backend, len(info.vocab),
             f"; torch fallback: {info.fallback_reason}" if info.fallback_reason else "")

    parts = assemble(settings, predictor, store=store)
    parts.follower.start()
    # A changed LOUPE_MODEL_PATH, while the registry serves another version, becomes a candidate (not ignored).
    threading.Thread(target=register_settings_model, args=(settings, store), name="register-settings-model",
                     daemon=True).start()
    try:
        if not serve(build_server(settings, pipeline=parts.pipeline, store=parts.store, desk=parts.desk,
                                  monitor=parts.monitor), settings):
            sys.exit(1)  # uvicorn has logged why (e.g. the port is taken)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C after its graceful shutdown; nothing left to report
    finally:
        parts.follower.stop()
        parts.shadow.close()
        parts.monitor.stop()
        parts.store.close()  # flush the prediction log written in the background


class Parts(NamedTuple):
    store: object  # review.store.ReviewStore
    router: object  # serving.router.ModelRouter
    pipeline: object  # serving.pipeline.Pipeline
    desk: object  # review.desk.ReviewDesk
    follower: object = None  # serving.follower.RegistryFollower: keeps the router on the registry's versions
    shadow: object = None  # serving.shadow.ShadowScorer: a shadow candidate's answers, off the request path
    monitor: object = None  # review.monitor.Monitor: drift alarms, /metrics


def assemble(settings, predictor, *, store=None, rescore: bool = True, watch: bool = True) -> Parts:
    """The running parts around a loaded model: the store, the model router (following the registry), the shadow
    scorer, the prediction pipeline, the reviewer desk and the monitor (tests assemble the app the same way).

    ``predictor`` answers first. A fresh registry adopts it as current when it is the settings' model; then the
    registry decides (``parts.follower.sync()`` now, ``parts.follower.start()`` to poll). ``watch``: start the
    monitor's background checks (tests call ``parts.monitor.refresh()`` themselves instead)."""
    from review.desk import ReviewDesk
    from review.monitor import Monitor, References
    from review.store import ReviewStore
    from serving.follower import RegistryFollower, adopt
    from serving.imageio import decode_image
    from serving.metrics import Metrics
    from serving.pipeline import Pipeline
    from serving.router import ModelRouter
    from serving.shadow import ShadowScorer
    from serving.unfamiliar import Detectors

    store = store or ReviewStore(settings)
    store.register_model(predictor.info)
    adopt(store, settings, predictor)
    router = ModelRouter(predictor)
    if rescore:
        served = [predictor.info.version]

        def on_change(routes) -> None:  # only a new current model re-scores, not a candidate's arrival
            if routes.current.info.version != served[0]:
                served[0] = routes.current.info.version
                rescore_in_background(store, routes.current)

        router.on_change(on_change)
        rescore_in_background(store, predictor)
    follower = RegistryFollower(store, router, settings)
    shadow = ShadowScorer(store, decode=partial(decode_image, max_bytes=settings.max_upload_bytes,
                                                max_pixels=settings.max_pixels), maxsize=settings.shadow_queue_size)
    metrics = Metrics()
    detectors = Detectors(References(settings.data_dir))  # unfamiliar inputs, per answering model version
    monitor = Monitor(settings, store, router, metrics, detectors=detectors)
    if watch:
        monitor.start()
    pipeline = Pipeline.from_settings(settings, router, store, shadow=shadow, observer=metrics, detectors=detectors)
    return Parts(store, router, pipeline, ReviewDesk(store), follower, shadow, monitor)


def rescore_in_background(store, predictor) -> None:
    """A model version that starts answering re-scores every labelled image it has not scored, so what it now
    gets confidently wrong reaches the review queue (only new images: cheap on later starts)."""
    from review import jobs

    log = logging.getLogger("loupe")

    def run() -> None:
        store.register_model(predictor.info)
        done = jobs.rescore_labelled(store, predictor)
        log.debug("re-scored by %s: %s", predictor.info.version, done)
        if done["scored"] or done["missing_images"]:  # nothing new to check is the usual restart: not worth a line
            n = done["scored"]
            missing = (f" {done['missing_images']} could not be re-checked: their image files are gone."
                       if done["missing_images"] else "")
            log.info("Re-checked %d labelled image%s with the model now serving (%s); %d went to the review queue.%s",
                     n, "" if n == 1 else "s", predictor.info.version, done["queued"], missing)

    threading.Thread(target=run, name="rescore", daemon=True).start()


if __name__ == "__main__":
    main()
