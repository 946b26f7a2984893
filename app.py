"""Loupe: serve a fastai image classifier (Gradio UI + REST API). ``python app.py`` (also what HF Spaces runs).

Thin on purpose: settings, logging, the model (loaded once), the review store, the server. Nothing heavy is
imported at module level, so a bad setting or model file fails fast, before Gradio's ~5 s import.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import NamedTuple


def main() -> None:
    from pydantic import ValidationError

    from settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"loupe: invalid configuration (LOUPE_* environment variables):\n{e}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("loupe")

    from model.loading import ModelLoadError, load_predictor

    try:
        predictor = load_predictor(settings)
    except ModelLoadError as e:
        # The message names the file and what to do; a traceback would only bury it.
        print(f"loupe: {e}", file=sys.stderr)
        sys.exit(2)
    info = predictor.info
    log.info("serving %s (%s, %d classes)%s", info.version, info.backend, len(info.vocab),
             f"; torch fallback: {info.fallback_reason}" if info.fallback_reason else "")

    from ui.server import build_server, serve

    parts = assemble(settings, predictor)
    try:
        if not serve(build_server(settings, pipeline=parts.pipeline, store=parts.store, desk=parts.desk), settings):
            sys.exit(1)  # uvicorn has logged why (e.g. the port is taken)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C after its graceful shutdown; nothing left to report
    finally:
        parts.store.close()  # flush the prediction log written in the background


class Parts(NamedTuple):
    store: object  # review.store.ReviewStore
    router: object  # serving.router.ModelRouter
    pipeline: object  # serving.pipeline.Pipeline
    desk: object  # review.desk.ReviewDesk


def assemble(settings, predictor, *, rescore: bool = True) -> Parts:
    """The running parts around a loaded model: the store, the model router, the prediction pipeline and the
    reviewer desk (tests assemble the app the same way)."""
    from review.desk import ReviewDesk
    from review.store import ReviewStore
    from serving.pipeline import Pipeline
    from serving.router import ModelRouter

    store = ReviewStore(settings)
    store.register_model(predictor.info)
    router = ModelRouter(predictor)
    if rescore:
        router.on_change(lambda routes: rescore_in_background(store, routes.current))
        rescore_in_background(store, predictor)
    return Parts(store, router, Pipeline.from_settings(settings, router, store), ReviewDesk(store))


def rescore_in_background(store, predictor) -> None:
    """A model version that starts answering re-scores every labelled image it has not scored, so what it now
    gets confidently wrong reaches the review queue (only new images: cheap on later starts)."""
    from review import jobs

    log = logging.getLogger("loupe")

    def run() -> None:
        store.register_model(predictor.info)
        log.info("labelled images re-scored by %s: %s", predictor.info.version,
                 jobs.rescore_labelled(store, predictor))

    threading.Thread(target=run, name="rescore", daemon=True).start()


if __name__ == "__main__":
    main()
