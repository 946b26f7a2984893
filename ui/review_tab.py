"""The reviewer-only Review app (mounted at /review): one queued image at a time, decided with a key press.

Why the image is an <img> with a data: URL inside gr.HTML and not a gr.Image: Gradio copies a gr.Image value into
its shared cache folder, and *every* mounted Gradio app serves that folder, so the copy would be reachable through
the public app's file route at "/" without any login (and would outlive our retention purge). A data: URL only
travels inside the authenticated event stream and is never written to disk.

What the events do is plain Python in ui/review_handlers.py (tests call it without a server); ``build_review_app``
wires it to components.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gradio as gr

from review.types import REASONS
from ui.review_auth import auth_fn, hf_auth_dependency
from ui.review_handlers import EMPTY_STATE, ReviewHandlers, Screen
from ui.review_keys import (
    BAD_IMAGE,
    CLAIM,
    CONFIRM,
    OUT_OF_DOMAIN,
    SKIP,
    UNDO,
    keyboard_js,
)

COUNTS_EVERY_S = 15.0


# A form POST to <this page>/logout (relative: works wherever the app is mounted); the answer redirects back here.
LOGOUT_JS = """() => {
  const form = document.createElement("form");
  form.method = "post";
  form.action = window.location.pathname.replace(/\\/?$/, "/") + "logout";
  document.body.appendChild(form);
  form.submit();
}"""

CSS = """
#review-image { min-height: 60vh; display: flex; align-items: center; justify-content: center; }
#review-img { width: 100%; height: 72vh; object-fit: contain; }
#review-img.small { image-rendering: pixelated; }  /* enlarge tiny images without blurring their pixels */
#review-empty { text-align: center; max-width: 36rem; opacity: 0.85; }
#review-empty .calm { font-size: 1.6em; margin-bottom: 0.6em; }
#review-keys { font-size: 0.85em; opacity: 0.8; }
#review-keys kbd { border: 1px solid currentColor; border-radius: 3px; padding: 0 0.3em; font-size: 0.9em; }
#review-progress { font-size: 1.1em; }
"""


def build_review_app(settings, desk, tabs: Sequence[tuple[str, Callable[[gr.Blocks], None]]] = ()) -> gr.Blocks:
    """The reviewer-only app: the Review tab, then ``tabs`` ((title, render(app)), e.g. Models, Monitor)."""
    with gr.Blocks(title="Loupe · Review", analytics_enabled=False) as app:
        with gr.Tabs(elem_id="reviewer-tabs"):
            with gr.Tab("Review", id="review"):
                render_review(app, settings, desk)
            for title, render in tabs:
                with gr.Tab(title, id=title.lower()):
                    render(app)
        app.load(None, js=keyboard_js())
    return app


def render_review(app: gr.Blocks, settings, desk) -> None:
    """The Review tab's components and events (inside ``app``'s context)."""
    h = ReviewHandlers(settings, desk)
    state = gr.State(dict(EMPTY_STATE))
    # First on the page: at 1280x900 the counts below the image start out of sight.
    progress_line = gr.Markdown(elem_id="review-progress")
    with gr.Row():
        with gr.Column(scale=3):
            image = gr.HTML(elem_id="review-image", js_on_load=None)
        with gr.Column(scale=2):
            with gr.Row(equal_height=True):
                status = gr.Markdown(elem_id="review-status")
                # a POST to /review/logout (LOGOUT_JS): Loupe's route ends the session and releases the claim
                logout = gr.Button("Log out", size="sm", scale=0, min_width=80, elem_id="review-logout")
            probs = gr.Label(label="Model's probabilities", num_top_classes=settings.top_k, elem_id="review-probs")
            details = gr.Markdown(elem_id="review-details")
            # Wording and keys come with each item (its classes may take a letter, its claims add a choice).
            with gr.Row():
                confirm = gr.Button(CONFIRM.wording, variant="primary", elem_id=CONFIRM.elem_id, min_width=90)
                claim = gr.Button(CLAIM.wording, variant="primary", elem_id=CLAIM.elem_id, min_width=90,
                                  visible=False)
            with gr.Row():
                ood = gr.Button(OUT_OF_DOMAIN.wording, elem_id=OUT_OF_DOMAIN.elem_id, min_width=90)
                bad = gr.Button(BAD_IMAGE.wording, elem_id=BAD_IMAGE.elem_id, min_width=90)
            choice = gr.Radio([], label="Relabel as (press the class key to relabel at once)",
                              elem_id="review-relabel-choice")
            with gr.Row():
                relabel = gr.Button("Relabel", elem_id="review-relabel", min_width=90)
                skip = gr.Button(SKIP.wording, elem_id=SKIP.elem_id, min_width=90)
                undo = gr.Button(UNDO.wording, elem_id=UNDO.elem_id, min_width=90)
            # Key target: the keyboard script puts the class of the pressed key here and clicks the button, so a
            # key press needs no selection round trip.
            key_label = gr.Textbox(visible="hidden", elem_id="review-key-label")
            key_relabel = gr.Button(visible="hidden", elem_id="review-key-relabel")
            keys = gr.HTML(elem_id="review-keys")
    with gr.Accordion("Progress and filters", open=True):
        counts = gr.Markdown(elem_id="review-counts")
        with gr.Row():
            reason = gr.Dropdown([("All reasons", "")] + [(n.replace("_", " "), n) for n in REASONS], value="",
                                 label="Reason", elem_id="review-filter-reason")
            # Filled on page load: models are registered while the app runs. (Gradio keeps a session's
            # updated choices, and checks submitted values against those.)
            predicted = gr.Dropdown([("All classes", "")], value="", label="Predicted class",
                                    elem_id="review-filter-predicted")
            model = gr.Dropdown([("All models", "")], value="", label="Model version",
                                elem_id="review-filter-model")
            refresh = gr.Button("Refresh", elem_id="review-refresh")
    token = gr.Textbox(visible="hidden", elem_id="review-token")
    filters = [reason, predicted, model]
    outputs = [image, details, probs, status, token, state, choice, keys, confirm, claim, ood, bad, skip, undo]
    # One concurrency group for every review event: they are short DB transactions, and SQLite serialises
    # writers anyway; a handful at once keeps several reviewers responsive.
    opts = dict(outputs=outputs, concurrency_id="review", concurrency_limit=4, api_visibility="private")

    def flat(screen: Screen) -> tuple:
        return (*screen[:-1], *screen.buttons)

    def act(action: str):
        def handler(token, state, reason, predicted, model_version, request: gr.Request,
                    profile: gr.OAuthProfile | None = None):
            return flat(h.decide(action, None, token, state, reason, predicted, model_version, request, profile))
        return handler

    def relabel_fn(label, token, state, reason, predicted, model_version, request: gr.Request,
                   profile: gr.OAuthProfile | None = None):
        return flat(h.decide("relabel", label, token, state, reason, predicted, model_version, request, profile))

    def undo_fn(token, state, reason, predicted, model_version, request: gr.Request,
                profile: gr.OAuthProfile | None = None):
        return flat(h.undo(token, state, reason, predicted, model_version, request, profile))

    def show_fn(state, reason, predicted, model_version, request: gr.Request,
                profile: gr.OAuthProfile | None = None):
        return flat(h.show(state, reason, predicted, model_version, request, profile))

    inputs = [token, state, *filters]
    events = [button.click(act(a.name), inputs, **opts)
              for button, a in ((confirm, CONFIRM), (claim, CLAIM), (ood, OUT_OF_DOMAIN), (bad, BAD_IMAGE),
                                (skip, SKIP))]
    events.append(key_relabel.click(relabel_fn, [key_label, *inputs], **opts))
    events.append(relabel.click(relabel_fn, [choice, *inputs], **opts))
    events.append(undo.click(undo_fn, inputs, **opts))
    events += [trigger(show_fn, [state, *filters], **opts)
               for trigger in (refresh.click, reason.change, predicted.change, model.change, app.load)]
    progress = dict(inputs=filters, outputs=[progress_line, counts], concurrency_id="review-progress",
                    concurrency_limit=2, api_visibility="private", show_progress="hidden")
    for event in events:
        event.then(h.progress, **progress)  # after the next item is on screen, never before
    gr.Timer(COUNTS_EVERY_S).tick(h.progress, **progress)  # other reviewers' progress too
    app.load(h.filter_choices, None, [predicted, model], api_visibility="private")
    logout.click(None, js=LOGOUT_JS)


def review_mount_options(settings) -> dict:
    """auth for ``gr.mount_gradio_app(..., path="/review")``: HF OAuth allowlist on a Space, else accounts."""
    if settings.hf_sign_in:
        return {"auth_dependency": hf_auth_dependency(settings), "css": CSS}
    message = "Reviewers only." if settings.reviewers.strip() else "No reviewer accounts are configured " \
        "(set LOUPE_REVIEWERS; see `python -m review hash-password`)."
    return {"auth": auth_fn(settings), "auth_message": message, "css": CSS}
