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

    import uvicorn

    from ui.server import build_server

    parts = assemble(settings, predictor)
    try:
        app = build_server(settings, pipeline=parts.pipeline, store=parts.store, desk=parts.desk)
        # Per-request access lines are noise. Open browser tabs keep event streams open: without a graceful-shutdown
        # timeout a SIGTERM would wait for them forever (and Docker's SIGKILL would then lose the unflushed log).
        # Request bodies are timed by ui/body_timeout.py; uvicorn has no body timeout. timeout_keep_alive only
        # closes idle connections *between* requests. No limit_concurrency: it counts silent connections too
        # (measured: 20 sockets that never send a byte, which uvicorn never times out, turned /healthz into 503).
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                                timeout_graceful_shutdown=5, timeout_keep_alive=5)
        server = announcing_server(config)
        server.run()
        if not server.started:
            sys.exit(1)  # uvicorn has logged why (e.g. the port is taken)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C after its graceful shutdown; nothing left to report
    finally:
        parts.store.close()  # flush the prediction log written in the background


def announcing_server(config):
    """A uvicorn server that says where the app, the review and the API docs are, once it really listens."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and getattr(self, "servers", None):
                port = self.servers[0].sockets[0].getsockname()[1]
                host = config.host if config.host not in ("0.0.0.0", "::", "") else "localhost"
                base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
                print(f"App: {base}/\nReview: {base}/review/ (reviewers log in)\nAPI docs: {base}/api/docs",
                      flush=True)

    return Server(config)


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
