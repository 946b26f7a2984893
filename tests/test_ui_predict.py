"""The Predict UI's handlers called as plain Python, on the real demo model and a real review database."""

from __future__ import annotations

import base64

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from settings import Settings
from tests.app_support import app_parts
from tests.test_api import (
    MB,
    animated_gif,
    bad_inputs,
    examples,
    png,
    predictions,
    rotated_with_exif,
    stored,
    upright_sensitive_digit,
)
from ui.predict_handlers import PredictHandlers
from ui.predict_tab import build_predict_app, storage_notice

TOL = 1e-5


class AnyFile:
    """Vouches for every path: these tests are about decoding; tests/test_security_files.py covers which paths."""

    def claim(self, path) -> bool:
        return True


@pytest.fixture
def ui(tmp_path, demo_predictor):
    settings = Settings(data_dir=tmp_path / "data", max_upload_mb=0.5, stream_log_every=3)
    service = app_parts(settings, demo_predictor)
    yield PredictHandlers(settings, service.pipeline, service.store, AnyFile()), service
    service.store.close()


def as_upload(tmp_path, name: str, data: bytes) -> dict:
    """What Gradio hands a preprocess=False handler for an uploaded file."""
    path = tmp_path / name
    path.write_bytes(data)
    return {"path": str(path), "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def data_url(img: Image.Image, fmt: str = "JPEG") -> dict:
    """What a live-webcam frame looks like (no file: a data: URL)."""
    return {"path": None, "url": f"data:image/{fmt.lower()};base64," + base64.b64encode(png(img, fmt)).decode()}


def test_bad_inputs_raise_gr_error_with_the_message_and_store_nothing(ui, tmp_path):
    h, service = ui
    before = stored(service)
    for bad in bad_inputs(h.max_bytes):
        with pytest.raises(gr.Error) as err:
            h.predict_batch([as_upload(tmp_path, bad.name, bad.data)], "upload")
        assert bad.message in err.value.message, (bad.name, err.value.message)
    assert stored(service) == before
    labels, _, _, _ = h.predict_batch([as_upload(tmp_path, "ok.png", examples()["2"].read_bytes())], "upload")
    assert labels[0] is not None
    assert stored(service)[1] == before[1] + 1  # a stored image would have shown up


@pytest.mark.parametrize("digit", ["0", "6", "9"])
def test_good_upload_gives_top_k_and_version_and_is_logged(ui, tmp_path, demo_predictor, digit):
    h, service = ui
    path = examples()[digit]
    labels, infos, states, _ = h.predict_batch([as_upload(tmp_path, path.name, path.read_bytes())], "upload")
    expected = demo_predictor.predict_probs([Image.open(path).convert("RGB")])[0]
    assert list(labels[0])[0] == digit and len(labels[0]) == h.settings.top_k
    assert labels[0][digit] == pytest.approx(float(expected.max()), abs=TOL)
    assert demo_predictor.info.version in infos[0] and infos[0].endswith(" ms")
    (row,) = predictions(service, id=states[0]["id"])
    assert row.source == "upload" and row.predicted == digit == states[0]["label"]
    np.testing.assert_allclose(row.probs, expected, atol=TOL)


def test_accepted_odd_inputs(ui, tmp_path, demo_predictor):
    h, _ = ui
    ex = examples()
    digit, upright = upright_sensitive_digit(demo_predictor)
    payloads = [
        as_upload(tmp_path, "dot.png", png(Image.new("RGB", (1, 1), "white"))),
        as_upload(tmp_path, "thin.png", png(Image.new("L", (1, 20000), 255))),
        as_upload(tmp_path, "anim.gif", animated_gif(Image.open(ex["3"]), Image.open(ex["8"]))),
        as_upload(tmp_path, "rotated.jpg", rotated_with_exif(upright)),
    ]
    labels, infos, states, _ = h.predict_batch(payloads, "upload")
    assert all(isinstance(lab, dict) and len(lab) == 5 for lab in labels)
    assert next(iter(labels[2])) == "3"  # first frame of the GIF, not the second
    assert next(iter(labels[3])) == digit  # EXIF orientation applied exactly once


def test_one_bad_image_in_a_batch_does_not_fail_the_others(ui, tmp_path):
    h, service = ui
    good = as_upload(tmp_path, "5.png", examples()["5"].read_bytes())
    bad = as_upload(tmp_path, "bad.jpg", b"<html><body>hi</body></html>")
    labels, infos, states, _ = h.predict_batch([good, bad, None], "webcam")
    assert next(iter(labels[0])) == "5" and states[0]["id"]
    assert labels[1] is None and "web page (HTML)" in infos[1] and states[1] is None
    assert labels[2] is None and infos[2] == "" and states[2] is None  # cleared input: nothing to do
    rows = predictions(service)
    assert [(r.source, r.predicted) for r in rows] == [("webcam", "5")]


def test_none_input_is_a_no_op(ui):
    h, service = ui
    assert h.predict_batch([None], "upload") == ([None], [""], [None], [None])
    assert stored(service)[1] == 0


def test_sketch_transparent_canvas_is_white_paper(ui, tmp_path, demo_predictor):
    """The Sketchpad sends black strokes on a transparent canvas; the model must see them on white."""
    h, service = ui
    ink = Image.open(examples()["4"]).convert("L")
    strokes = Image.merge("RGBA", (*(Image.new("L", ink.size, 0),) * 3, ink.point(lambda v: 255 - v)))
    payload = {"background": None, "layers": [], "composite": as_upload(tmp_path, "sketch.png", png(strokes))}
    labels, _, states, _ = h.predict_batch([payload], "sketch")
    on_white = demo_predictor.predict_probs([Image.open(examples()["4"]).convert("RGB")])[0]
    assert next(iter(labels[0])) == "4"
    assert labels[0]["4"] == pytest.approx(float(on_white[4]), abs=2e-3)  # ink alpha 255-v over white ~ v
    assert predictions(service, id=states[0]["id"])[0].source == "sketch"


def test_blank_or_missing_sketch_is_refused(ui, tmp_path):
    h, service = ui
    before = stored(service)
    blank = {"composite": as_upload(tmp_path, "blank.png", png(Image.new("RGBA", (280, 280), (0, 0, 0, 0))))}
    for payload in (blank, {"background": None, "layers": [], "composite": None}):
        with pytest.raises(gr.Error, match="draw something first"):
            h.predict_batch([payload], "sketch")
    assert stored(service) == before and predictions(service) == []


def test_live_stream_logs_one_frame_in_n(ui, demo_predictor):
    h, service = ui
    frame = Image.open(examples()["8"]).convert("RGB")
    count = 0
    for _ in range(7):
        label, info, count = h.stream_frame(data_url(frame), count)
        assert next(iter(label)) == "8" and "ms" in info
    assert count == 7
    assert [r.source for r in predictions(service)] == ["stream"] * 3  # frames 1, 4 and 7 (stream_log_every=3)


def test_live_stream_survives_a_bad_frame(ui):
    h, service = ui
    label, info, count = h.stream_frame({"path": None, "url": "data:image/jpeg;base64,AAAA"}, 2)
    assert label is None and "Frame skipped" in info and count == 2
    skipped = h.stream_frame(None, 2)
    assert skipped[2] == 2 and predictions(service) == []


def test_oversize_data_url_is_refused_without_decoding_it_all(ui):
    h, _ = ui
    huge = {"path": None, "url": "data:image/png;base64," + base64.b64encode(b"\0" * (2 * h.max_bytes)).decode()}
    assert len(h.read(huge)) == h.max_bytes + 1
    label, info, _ = h.stream_frame(huge, 0)
    assert label is None and "too large" in info


def test_feedback_is_stored(ui, tmp_path):
    h, service = ui
    _, _, (state,), _ = h.predict_batch([as_upload(tmp_path, "1.png", examples()["1"].read_bytes())], "upload")
    assert "right" in h.feedback(state, correct=True)
    service.store.flush()
    assert predictions(service, id=state["id"])[0].feedback_correct is True
    wrong = "7" if state["label"] != "7" else "2"
    assert wrong in h.feedback(state, correct=None, claimed=wrong)
    row = predictions(service, id=state["id"])[0]
    assert row.claimed_label == wrong and row.feedback_correct is False and row.loss is not None


def test_feedback_needs_a_prediction_and_a_known_class(ui):
    h, service = ui
    info = service.router.current.info
    assert "Classify an image first" in h.feedback(None, correct=True)
    state = {"id": "x" * 32, "label": "1", "model": info.version, "classes": list(info.vocab)}
    with pytest.raises(gr.Error, match="listed classes"):
        h.feedback(state, correct=None, claimed="banana")
    with pytest.raises(gr.Error, match="unknown prediction"):
        h.feedback({**state, "id": "0" * 32}, correct=True)


def test_storage_notice_follows_the_setting(tmp_path):
    assert "are stored" in storage_notice(Settings(data_dir=tmp_path))
    assert "not stored" in storage_notice(Settings(data_dir=tmp_path, store_uploads=False))
    assert "30 days" in storage_notice(Settings(data_dir=tmp_path, retention_days=30))


def test_store_uploads_off_keeps_no_image(tmp_path, demo_predictor):
    settings = Settings(data_dir=tmp_path / "data", store_uploads=False)
    service = app_parts(settings, demo_predictor)
    try:
        h = PredictHandlers(settings, service.pipeline, service.store, AnyFile())
        h.predict_batch([as_upload(tmp_path, "3.png", examples()["3"].read_bytes())], "upload")
        assert stored(service)[1] == 0
    finally:
        service.store.close()


def test_app_wiring(tmp_path, demo_predictor):
    """The Blocks: predict is a batched, public endpoint; every other event is private; the queue is bounded."""
    settings = Settings(data_dir=tmp_path / "data", max_batch_size=6, queue_max_size=9, model_workers=3)
    service = app_parts(settings, demo_predictor)
    try:
        app = build_predict_app(settings, service.pipeline, service.store)
    finally:
        service.store.close()
    fns = {fn.api_name: fn for fn in app.fns.values() if fn.api_name}
    predict = fns["predict"]
    assert predict.batch and predict.max_batch_size == 6 and not predict.preprocess
    assert predict.api_visibility == "public" and predict.concurrency_id == "model"
    assert predict.concurrency_limit == 3  # LOUPE_MODEL_WORKERS, not the host's core count
    public = sorted(n for n, fn in fns.items() if fn.api_visibility == "public")
    assert public == ["feedback", "predict"]  # feedback: for gradio_client users (it never runs the model)
    assert app._queue.max_size == 9
    assert fns["predict_stream"].time_limit == settings.stream_time_limit


def test_max_bytes_follows_settings(tmp_path, demo_predictor):
    settings = Settings(data_dir=tmp_path / "d", max_upload_mb=2)
    service = app_parts(settings, demo_predictor)
    try:
        h = PredictHandlers(settings, service.pipeline, service.store, AnyFile())
        assert h.max_bytes == service.pipeline.max_bytes == 2 * MB
        with pytest.raises(gr.Error, match="too large"):
            h.predict_batch([as_upload(tmp_path, "big.png", b"\x89PNG" + b"\0" * (2 * MB))], "upload")
    finally:
        service.store.close()


def test_jpeg_frame_roundtrip_keeps_the_digit(ui):
    """Live frames arrive as JPEG data URLs: a digit on a 4:3 camera frame is still that digit."""
    from tests.browser_support import frame_with

    h, _ = ui
    frame = frame_with(Image.open(examples()["2"]), (320, 240))
    label, _, _ = h.stream_frame(data_url(frame), 0)
    assert next(iter(label)) == "2"


def example_blocks(app) -> list:
    import gradio as gr

    return [b for b in app.blocks.values() if isinstance(b, gr.Dataset)]


def test_header_says_what_the_model_does_and_follows_the_serving_model(ui, tmp_path):
    from model.predictor import ModelInfo
    from tests.review_fixtures import FakePredictor
    from ui.examples import DEMO_DESCRIPTION

    h, service = ui
    demo = service.router.current.info
    header = h.header()
    assert header.startswith(f"# {demo.name}\n{DEMO_DESCRIPTION}") and demo.version in header
    own = Settings(data_dir=tmp_path / "d", model_path=tmp_path / "bears.pkl",
                   model_description="Grizzly, black or teddy? Upload a photo of a bear.")
    assert "Grizzly, black or teddy? Upload a photo of a bear." in PredictHandlers(own, service.pipeline, None).header()
    plain = Settings(data_dir=tmp_path / "d", model_path=tmp_path / "bears.pkl")
    assert "Tells apart 10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9." in PredictHandlers(plain, service.pipeline,
                                                                                      None).header()
    many = tuple(f"c{i}" for i in range(30))
    service.router.promote(FakePredictor(ModelInfo("bears", "ef" * 32, many, "onnx"), None))
    promoted = PredictHandlers(plain, service.pipeline, None).header()  # what the page shows on its next load
    assert promoted.startswith("# bears\n") and "30 classes: c0, c1," in promoted and "and 18 more." in promoted


def test_own_examples_are_checked_at_start(tmp_path, demo_predictor, caplog):
    from ui.examples import load_examples

    folder = tmp_path / "examples"
    folder.mkdir()
    for d in ("3", "5", "7"):
        (folder / f"{d}.png").write_bytes(examples()[d].read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(examples()["1"].read_bytes()[:60])
    (folder / ".hidden.png").write_bytes(examples()["1"].read_bytes())
    settings = Settings(data_dir=tmp_path / "d", model_path=tmp_path / "own.pkl", examples_dir=folder)
    with caplog.at_level("WARNING", logger="loupe.examples"):
        shown = load_examples(settings)
    assert shown == [str(folder / f"{d}.png") for d in ("3", "5", "7")]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.png skipped: The file is truncated or corrupt" in skipped and "notes.txt skipped" in skipped
    assert load_examples(settings.model_copy(update={"max_examples": 2})) == shown[:2]
    assert load_examples(Settings(data_dir=tmp_path / "d", model_path=tmp_path / "own.pkl")) == []  # none set
    with pytest.raises(ValueError, match="not a folder"):
        Settings(data_dir=tmp_path / "d", examples_dir=tmp_path / "missing")

    service = app_parts(settings, demo_predictor)  # the page offers them like the demo's digits
    try:
        app = build_predict_app(settings, service.pipeline, service.store)
    finally:
        service.store.close()
    (dataset,) = example_blocks(app)
    assert len(dataset.samples) == 3
