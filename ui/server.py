"""One FastAPI app: REST routes first, then the reviewer-only Gradio app at /review, then the public one at /.

Order matters: a Gradio mount at "/" matches every path, so anything added after it is shadowed.
Gradio options that would otherwise come from environment variables are passed explicitly, so the
server behaves the same wherever it runs.

In front of it all (outermost first): security headers, the HTTP guard (what clients may send the Gradio apps:
see ui/http_guard.py), and a CORS middleware that allows no other origin. SECURITY.md explains the layers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import signal
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from serving.gate import Gate
from serving.metrics import GradioBusyCounter
from ui.api import build_api_router
from ui.body_timeout import BodyTimeoutMiddleware
from ui.http_guard import HttpGuard, PathAlias
from ui.http_headers import SecurityHeaders
from ui.models_tab import models_tab
from ui.monitor_tab import monitor_tabs
from ui.predict_tab import build_predict_app, model_slots
from ui.review_login import install_review_login
from ui.upload_store import UploadStore, gradio_folder, prepare_folder

SWEEP_EVERY_S = 1.0

CSS = """
#prediction-label, #live-label { min-height: 12rem; }
#storage-notice { font-size: 0.9em; opacity: 0.85; }
"""


def blocked_paths(settings) -> list[str]:
    """Our data (stored uploads, database, bundle cache) and the model's folder must never be served.
    (Example images are still shown: Gradio serves copies of them from its own cache.)"""
    from model.loading import model_source

    return [str(Path(settings.data_dir).resolve()), str(Path(model_source(settings).path).resolve().parent)]


def hardening(settings) -> dict:
    """mount_gradio_app options shared by both Gradio apps."""
    return dict(
        footer_links=["api"],
        run_history=False,  # would keep users' inputs in their browser and offer to sync them to a HF bucket
        blocked_paths=blocked_paths(settings),
        allowed_paths=[],
        max_file_size=settings.max_upload_bytes,
        enable_monitoring=False,
        show_error=False,  # unexpected exceptions stay in the server log; gr.Error messages still show
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        theme=gr.themes.Soft(),
        css=CSS,
    )


def build_server(settings, *, pipeline, store, desk, gate: Gate | None = None, monitor=None) -> FastAPI:
    """The whole HTTP surface. ``pipeline`` answers predictions (its router says which model); ``store`` takes
    feedback; ``desk`` serves reviewers; ``monitor`` (review.monitor.Monitor) feeds /metrics, the drift field of
    /healthz and the reviewers' Monitor tab."""
    uploads = _gradio_files(settings)
    app = FastAPI(title="Loupe", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json",
                  lifespan=functools.partial(_sweep_uploads, uploads))
    if gate is None:
        # As many REST predictions run at once as Gradio's model group; queue_max_size more may wait.
        gate = Gate(concurrency=model_slots(settings), max_waiting=settings.queue_max_size)
    app.include_router(build_api_router(settings, pipeline, store, gate, monitor))
    # Gradio's logout (and people typing the address) land on /review without the slash, which the
    # public mount at "/" would answer with 404.
    app.add_api_route("/review", lambda: RedirectResponse("/review/"), include_in_schema=False)
    if settings.hf_sign_in:
        _share_oauth_session(app, settings)
    install_review_login(app, settings, desk)  # before the mount: shadows Gradio's blocking /review/login
    review = _mount_review(app, settings, desk, tabs=[models_tab(settings, store, pipeline),
                                                      *monitor_tabs(settings, monitor)])
    public = build_predict_app(settings, pipeline, store, uploads=uploads)
    gr.mount_gradio_app(app, public, path="/", **hardening(settings))
    for blocks in (public, review):
        # mount_gradio_app never sets this, which leaves Gradio's own "only files in the upload folder" check on
        # event inputs off. The guard below is the real check; this one stays as a second layer.
        blocks.has_launched = True
    uploads.set_static(_config_paths(public.config, uploads.folder))
    if monitor is not None and monitor.metrics is not None:
        app.add_middleware(GradioBusyCounter, metrics=monitor.metrics)  # innermost: sees Gradio's own 503s
    _install_middleware(app, settings, uploads)
    return app


def _gradio_files(settings) -> UploadStore:
    """Loupe's own Gradio folder, emptied (a kill -9 leaves uploads behind), before any Blocks copies examples."""
    folder = gradio_folder(settings)
    prepare_folder(folder)
    # Gradio reads its folder from this variable when it builds components and apps (and later, per request).
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    mb = 1 << 20
    return UploadStore(folder, ttl_s=settings.upload_ttl_s, budget_bytes=int(settings.upload_budget_mb * mb),
                       disk_bytes=int(settings.upload_disk_mb * mb))


def _config_paths(config, folder: Path) -> list[str]:
    """Files Gradio copied into its folder while building the app (the example images): the page shows them."""
    found, stack = [], [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and node["path"].startswith(str(folder) + os.sep):
                found.append(node["path"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _install_middleware(app: FastAPI, settings, uploads: UploadStore) -> None:
    # add_middleware wraps: the last added is outermost. The body timeout sits outside the guard, which reads
    # event bodies itself before Gradio does; the security headers outside everything, 408s included.
    app.add_middleware(CORSMiddleware, allow_origins=[])  # no other origin; also switches Gradio's CORS off
    app.add_middleware(HttpGuard, store=uploads, alias=PathAlias(uploads.folder),
                       max_upload_bytes=settings.max_upload_bytes, secure_cookie=bool(settings.space_id))
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s, min_rate=settings.body_min_rate)
    app.add_middleware(SecurityHeaders, space=bool(settings.space_id))


@contextlib.asynccontextmanager
async def _sweep_uploads(store: UploadStore, app: FastAPI):
    async def sweep_forever():
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            await run_in_threadpool(store.sweep)

    task = asyncio.create_task(sweep_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await run_in_threadpool(store.close)


def _share_oauth_session(app: FastAPI, settings) -> None:
    """Let /review read the HF sign-in session that Gradio's OAuth routes set on the public app.

    Same cookie and secret as gradio.oauth.attach_oauth, so both mounts see one session.
    """
    from starlette.middleware.sessions import SessionMiddleware

    secret = hashlib.sha256(((settings.oauth_client_secret or "") + "-v4").encode()).hexdigest()
    app.add_middleware(SessionMiddleware, secret_key=secret, same_site="none", https_only=True)


def _mount_review(app: FastAPI, settings, desk, tabs=()) -> gr.Blocks:
    from ui.review_tab import build_review_app, review_mount_options

    review = build_review_app(settings, desk, tabs)
    gr.mount_gradio_app(app, review, path="/review", **{**hardening(settings),
                                                         **review_mount_options(settings)})
    return review


def serve(app: FastAPI, settings) -> bool:
    """Run ``app`` with uvicorn until Ctrl-C or SIGTERM; False if it never started listening.

    uvicorn handles SIGTERM itself, then restores the previous handler and raises the signal again: with the
    default handler that kills the process before the caller's ``finally`` can flush the prediction log (Docker
    stops containers with SIGTERM). So the handler it restores raises SystemExit, which unwinds normally.
    """
    def exit_cleanly(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, exit_cleanly)
    # Per-request access lines are noise. Open browser tabs keep event streams open: without a graceful-shutdown
    # timeout a SIGTERM would wait for them forever. Request bodies are timed by ui/body_timeout.py (uvicorn has
    # no body timeout); timeout_keep_alive only closes idle connections *between* requests. No limit_concurrency:
    # it counts silent connections too (measured: 20 sockets that never send a byte, which uvicorn never times
    # out, turned /healthz into 503).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=5, timeout_keep_alive=5)
    server = AnnouncingServer(config)
    server.run()
    return server.started


class AnnouncingServer(uvicorn.Server):
    """Says where the app, the review and the API docs are, once it really listens (uvicorn's own line names
    only the base address)."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and getattr(self, "servers", None):
            port = self.servers[0].sockets[0].getsockname()[1]
            host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "localhost"
            base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            print(f"App: {base}/\nReview: {base}/review/ (reviewers log in)\nAPI docs: {base}/api/docs", flush=True)
