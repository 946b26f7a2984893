"""One FastAPI app: REST routes first, then the reviewer-only Gradio app at /review, then the public one at /.

Order matters: a Gradio mount at "/" matches every path, so anything added after it is shadowed.
Gradio options that would otherwise come from environment variables are passed explicitly, so the
server behaves the same wherever it runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from serving.gate import Gate
from ui.api import build_api_router
from ui.body_timeout import BodyTimeoutMiddleware
from ui.predict_tab import build_predict_app, model_slots

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


def build_server(settings, *, pipeline, store, desk, gate: Gate | None = None) -> FastAPI:
    """The whole HTTP surface. ``pipeline`` answers predictions (its router says which model); ``store`` takes
    feedback; ``desk`` serves reviewers."""
    app = FastAPI(title="Loupe", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s, min_rate=settings.body_min_rate)
    if gate is None:
        # As many REST predictions run at once as Gradio's model group; queue_max_size more may wait.
        gate = Gate(concurrency=model_slots(settings), max_waiting=settings.queue_max_size)
    app.include_router(build_api_router(settings, pipeline, gate))
    # Gradio's logout (and people typing the address) land on /review without the slash, which the
    # public mount at "/" would answer with 404.
    app.add_api_route("/review", lambda: RedirectResponse("/review/"), include_in_schema=False)
    if settings.hf_sign_in:
        _share_oauth_session(app, settings)
    _mount_review(app, settings, desk)
    public = build_predict_app(settings, pipeline, store)
    gr.mount_gradio_app(app, public, path="/", **hardening(settings))
    return app


def _share_oauth_session(app: FastAPI, settings) -> None:
    """Let /review read the HF sign-in session that Gradio's OAuth routes set on the public app.

    Same cookie and secret as gradio.oauth.attach_oauth, so both mounts see one session.
    """
    from starlette.middleware.sessions import SessionMiddleware

    secret = hashlib.sha256(((settings.oauth_client_secret or "") + "-v4").encode()).hexdigest()
    app.add_middleware(SessionMiddleware, secret_key=secret, same_site="none", https_only=True)


def _mount_review(app: FastAPI, settings, desk) -> None:
    from ui.review_tab import build_review_app, review_mount_options

    review = build_review_app(settings, desk)
    gr.mount_gradio_app(app, review, path="/review", **{**hardening(settings),
                                                         **review_mount_options(settings)})
