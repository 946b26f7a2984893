"""The public Predict UI: upload/clipboard, webcam snapshot, live webcam, sketchpad (demo), feedback.

Every image, whichever tab it comes from, reaches us as a file in Gradio's upload cache and goes through
``decode_image`` (size cap, format allow-list, pixel cap from the header, EXIF, mode conversion): events
use ``preprocess=False`` so Gradio's own PIL decoding (no pixel cap, cryptic errors) never runs.
What the events do is plain Python in ui/predict_handlers.py, which tests call without a server.
"""

from __future__ import annotations

import gradio as gr

from model.predictor import ThreadPlan
from serving.pipeline import Pipeline
from ui.examples import load_examples
from ui.predict_handlers import PredictHandlers, serving_demo
from ui.result_panel import result_panel, wire_feedback

# Simultaneous live-webcam sessions. A stream holds its slot for its whole duration (up to
# stream_time_limit), so this is "how many people can watch live predictions at once".
LIVE_STREAMS = 4
# Feedback and other cheap events; they never run the model.
DEFAULT_CONCURRENCY = 4
# Gradio's Sketchpad starts with no tool selected ("select the draw tool to start"): pick the brush when the
# Draw tab opens. The tab's content may render a moment after the select event, hence the short retry.
SELECT_BRUSH_JS = """() => { let tries = 0; const pick = () => {
  const b = document.querySelector('#sketchpad button[aria-label="Brush"]');
  if (b) { if (!b.classList.contains('highlight')) b.click(); } else if (tries++ < 40) setTimeout(pick, 50); };
  pick(); }"""


def model_workers(settings) -> int:
    """Batches of model work run at once: LOUPE_MODEL_WORKERS, else one per core (model/predictor.ThreadPlan).

    The core count is the process's CPU affinity, not a container's CPU quota: set the setting there.
    """
    return ThreadPlan.from_settings(settings).lanes


def model_slots(settings) -> int:
    """Predictions in flight at once in the model group (Gradio: ``model_workers`` batches of up to
    ``max_batch_size``; REST: as many run slots). They meet in the pipeline's batcher, which needs several
    waiting at once to make batches; each holds only its model input meanwhile (serving/pipeline.py decodes at
    most one image per lane at a time)."""
    return model_workers(settings) * settings.max_batch_size


def storage_notice(settings) -> str:
    if settings.store_uploads:
        days = f" for {settings.retention_days} days" if settings.retention_days else ""
        return (f"Images you submit are stored{days} with the model's prediction so that people on our team "
                "can review them and improve the model. Don't submit images you don't want kept.")
    return "Images you submit are not stored: they are classified and then discarded."


def build_predict_app(settings, pipeline: Pipeline, store, uploads=None) -> gr.Blocks:
    h = PredictHandlers(settings, pipeline, store, uploads)
    demo_mode = serving_demo(settings)
    example_paths = load_examples(settings)
    with gr.Blocks(title=f"{pipeline.router.current.info.name} · Loupe", analytics_enabled=False,
                   delete_cache=(600, 600)) as app:
        header = gr.Markdown(h.header(), elem_id="header")
        # The reviewers' way in. Relative, so it follows any mount path; /review keeps its own login.
        gr.HTML('<p>Reviewing predictions? <a id="review-link" href="review/"><strong>Open the Review queue →'
                "</strong></a> (reviewers log in)</p>", elem_id="review-entry")
        gr.Markdown(storage_notice(settings), elem_id="storage-notice")
        if settings.hf_sign_in:
            # HF's OAuth callback lives on this (public) app; the /review mount reads the shared session.
            gr.LoginButton("Reviewer sign-in", elem_id="hf-login")
        # Not shown: what API clients (gradio_client) need from an answer, the prediction_id for /feedback above all.
        details = gr.JSON(visible=False, elem_id="prediction-details")
        # Each tab: its input on the left, its own answer and feedback on the right (ui/result_panel.py).
        with gr.Tabs(elem_id="input-tabs"):
            with gr.Tab("Upload", id="upload"):
                with gr.Row():
                    with gr.Column(scale=3):
                        upload = gr.Image(sources=["upload", "clipboard"], type="filepath", image_mode=None,
                                          label="Upload or paste an image", elem_id="upload-image", height=360)
                        examples = None
                        if example_paths:
                            examples = gr.Examples([[p] for p in example_paths], inputs=[upload],
                                                   cache_examples=False, label="Examples (click one)",
                                                   elem_id="examples", examples_per_page=10)
                    upload_panel = result_panel(settings)
            with gr.Tab("Webcam", id="webcam"):
                with gr.Row():
                    with gr.Column(scale=3):
                        webcam = gr.Image(sources=["webcam"], type="filepath", image_mode=None,
                                          label="Take a photo", elem_id="webcam-image", height=360,
                                          webcam_options=gr.WebcamOptions(mirror=False))
                    webcam_panel = result_panel(settings, "webcam-")
            with gr.Tab("Live webcam", id="live"):
                with gr.Row():
                    live = gr.Image(sources=["webcam"], type="filepath", image_mode=None, streaming=True,
                                    label="Live camera", elem_id="live-image", height=300,
                                    webcam_options=gr.WebcamOptions(mirror=False))
                    with gr.Column():
                        live_label = gr.Label(num_top_classes=settings.top_k, label="Live prediction",
                                              elem_id="live-label")
                        live_info = gr.Markdown(elem_id="live-info")
                live_count = gr.State(0)
            if demo_mode:
                with gr.Tab("Draw", id="draw") as draw_tab:
                    with gr.Row():
                        with gr.Column(scale=3):
                            # Black, thick strokes on a white background: what the digits were trained on, and
                            # thick enough to survive downscaling a 280 px canvas to 32 px.
                            sketch = gr.Sketchpad(type="filepath", image_mode="RGBA", canvas_size=(280, 280),
                                                  brush=gr.Brush(default_size=22, colors=["#000000"],
                                                                 default_color="#000000", color_mode="fixed"),
                                                  label="Draw a digit", elem_id="sketchpad", layers=False)
                            sketch_btn = gr.Button("Classify drawing", variant="primary", elem_id="sketch-submit")
                        draw_panel = result_panel(settings, "draw-")

        # Batched model events share one concurrency group: the limit is on model work, whatever the tab.
        model_event = dict(batch=True, max_batch_size=settings.max_batch_size, preprocess=False,
                           concurrency_limit=model_workers(settings), concurrency_id="model")

        # (param names show in the API docs; with batch=True each is really a list of images)
        def predict(image, request: gr.Request):
            return h.predict_batch(image, "upload", request)

        def predict_webcam(image, request: gr.Request):
            return h.predict_batch(image, "webcam", request)

        def predict_sketch(drawing, request: gr.Request):
            return h.predict_batch(drawing, "sketch", request)

        # .upload, not .change: .change fires twice when an image replaces another (two predictions, two rows).
        uploaded = [upload.upload(predict, inputs=[upload], outputs=[*upload_panel.answer_outputs, details],
                                  api_name="predict", **model_event)]
        if examples is not None:
            uploaded.append(examples.load_input_event.then(
                predict, inputs=[upload], outputs=[*upload_panel.answer_outputs, details], api_visibility="private",
                **model_event))
        wire_feedback(upload_panel, h, uploaded)
        wire_feedback(webcam_panel, h, [webcam.upload(
            predict_webcam, inputs=[webcam], outputs=[*webcam_panel.answer_outputs, details],
            api_name="predict_webcam", api_visibility="private", **model_event)])
        if demo_mode:
            draw_tab.select(None, js=SELECT_BRUSH_JS)
            wire_feedback(draw_panel, h, [sketch_btn.click(
                predict_sketch, inputs=[sketch], outputs=[*draw_panel.answer_outputs, details],
                api_name="predict_sketch", api_visibility="private", **model_event)])
        live.stream(h.stream_frame, inputs=[live, live_count], outputs=[live_label, live_info, live_count],
                    preprocess=False, stream_every=settings.stream_every, time_limit=settings.stream_time_limit,
                    concurrency_limit=LIVE_STREAMS, concurrency_id="live", api_name="predict_stream",
                    api_visibility="private", show_progress="hidden")
        app.load(h.header, outputs=[header], queue=False, api_visibility="private")  # the model serving now
        # gradio_client gets the prediction_id in the details output of /predict; this takes feedback on it.
        gr.api(h.api_feedback, api_name="feedback", concurrency_limit=DEFAULT_CONCURRENCY)
    # A full queue answers at once ("busy, try again") instead of making everyone wait.
    app.queue(max_size=settings.queue_max_size, default_concurrency_limit=DEFAULT_CONCURRENCY)
    return app
