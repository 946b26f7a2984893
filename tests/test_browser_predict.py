"""The Predict page in a real browser (Debian Chromium via Playwright) against a real ``python app.py``.

One app and one browser for the module. The fake camera plays a clip of two demo digits the model reads
correctly with high confidence (checked below, not assumed), so webcam and live-stream answers are decided
by what the camera shows. Screenshots of each tab land in test-results/.
"""

from __future__ import annotations

import base64
import re
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from review.db import Prediction
from review.imagestore import ImageStore
from tests.browser_support import (
    CHROMIUM,
    RESULTS,
    camera_roundtrip,
    frame_with,
    launch_args,
    start_app,
    wait_for,
    wait_until_settled,
    write_y4m,
)
from tests.test_api import examples

TIMEOUT = 30_000  # ms; the first event also warms up the model and the queue
TOP = "[data-testid='label-output-value']"


@pytest.fixture(scope="module")
def digits(demo_predictor) -> tuple[str, str]:
    """Two digits the model gets right, confidently, after the camera path (4:3 frame, YUV 4:2:0, JPEG)."""
    vocab = demo_predictor.info.vocab
    seen = {d: camera_roundtrip(frame_with(Image.open(p))) for d, p in examples().items()}
    probs = demo_predictor.predict_probs(list(seen.values()))
    ok = sorted((float(row.max()), d) for d, row in zip(seen, probs, strict=True) if vocab[int(row.argmax())] == d)
    confident = [d for p, d in reversed(ok) if p >= 0.9]
    assert len(confident) >= 2, f"the demo model reads too few camera frames confidently: {ok}"
    return confident[0], confident[1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, digits):
    frames = [frame_with(Image.open(examples()[d])) for d in digits]
    # 10 fps, 1.5 s per digit: a 3 s loop, so a 0.5 s live stream sees both within seconds.
    return write_y4m(tmp_path_factory.mktemp("camera") / "digits.y4m", frames, fps=10, repeat=15)


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_settings, demo_predictor):
    data = tmp_path_factory.mktemp("browser-app") / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")  # converted bundle: start-up is just imports
    proc = start_app(data)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def browser(playwright, clip):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (see .ci/run)")
    browser = playwright.chromium.launch(**launch_args(clip))
    yield browser
    browser.close()


@pytest.fixture
def page(browser, app):
    context = browser.new_context(permissions=["camera", "clipboard-read", "clipboard-write"],
                                  viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(app.url)
    yield page
    context.close()


def shot(page, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / f"predict-{name}.png"))  # the viewport: toasts included


def rows(app, **where) -> list[Prediction]:
    engine = create_engine(f"sqlite:///{app.data_dir / 'loupe.db'}")
    try:
        with Session(engine) as s:
            return list(s.scalars(select(Prediction).filter_by(**where).order_by(Prediction.created)))
    finally:
        engine.dispose()


def open_camera(page, elem_id: str) -> None:
    grant = page.locator(f"#{elem_id} [title='grant webcam access'] button")
    if grant.count():  # "Click to Access Webcam" appears even with the fake-camera flags
        grant.click()
    page.wait_for_function(f"() => {{ const v = document.querySelector('#{elem_id} video');"
                           " return v && v.readyState >= 2 }", timeout=TIMEOUT)


def test_upload_shows_prediction_version_and_time(page, app, demo_predictor):
    page.locator("#upload-image input[data-testid='file-upload']").set_input_files(str(examples()["6"]))
    expect(page.locator(f"#prediction-label {TOP}")).to_have_text("6")
    info = page.locator("#prediction-info")
    expect(info).to_contain_text(demo_predictor.info.version)
    expect(info).to_contain_text(" ms")
    expect(page.locator("#storage-notice")).to_contain_text("stored")
    shot(page, "upload")
    wait_for(lambda: rows(app, source="upload", predicted="6"), what="the upload's prediction row")


def test_clipboard_paste(page, app):
    data = base64.b64encode(examples()["8"].read_bytes()).decode()
    page.evaluate("""async (b64) => { const bin = atob(b64); const bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
        await navigator.clipboard.write([new ClipboardItem({'image/png': new Blob([bytes], {type: 'image/png'})})]);
    }""", data)
    page.locator("#upload-image button[aria-label='Paste from clipboard']").click()
    expect(page.locator(f"#prediction-label {TOP}")).to_have_text("8")
    wait_for(lambda: rows(app, source="upload", predicted="8"), what="the pasted image's row")


def test_feedback_is_stored(page, app):
    page.locator("#examples button.gallery-item").nth(2).click()  # example digit_2
    expect(page.locator(f"#prediction-label {TOP}")).to_have_text("2")
    page.locator("#feedback-no").click()
    expect(page.locator("#feedback-status")).to_contain_text("Thanks")
    page.locator("#feedback-label input").click()
    page.get_by_role("option", name="7", exact=True).click()
    expect(page.locator("#feedback-status")).to_contain_text("the right answer is 7")
    row = wait_for(lambda: [r for r in rows(app, predicted="2") if r.claimed_label == "7"], what="feedback row")[0]
    assert row.feedback_correct is False and row.loss is not None


def test_bad_upload_shows_the_message_and_server_keeps_serving(page, app, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF")
    before = len(rows(app))
    page.locator("#upload-image input[data-testid='file-upload']").set_input_files(str(bad))
    expect(page.get_by_text("This is a PDF document, not an image.")).to_be_visible()
    wait_until_settled(page, "[data-testid='toast-text']")
    shot(page, "bad-upload")
    assert httpx.get(app.url + "/healthz").status_code == 200
    # A good upload afterwards still works, and only it is stored.
    page.locator("#upload-image input[data-testid='file-upload']").set_input_files(str(examples()["0"]))
    expect(page.locator(f"#prediction-label {TOP}")).to_have_text("0")
    wait_for(lambda: len(rows(app)) == before + 1, what="exactly one new row")


def test_webcam_snapshot_is_classified_by_what_the_camera_shows(page, app, digits, demo_predictor):
    page.get_by_role("tab", name="Webcam", exact=True).click()
    open_camera(page, "webcam-image")
    page.locator("#webcam-image button[aria-label='capture photo']").click()
    label = page.locator(f"#webcam-prediction-label {TOP}")
    expect(label).to_have_text(re.compile(f"^({'|'.join(digits)})$"))
    shown = label.inner_text()
    shot(page, "webcam")
    # The server logged the frame it saw: re-reading that stored image gives the label the page shows.
    (row,) = wait_for(lambda: rows(app, source="webcam"), what="the webcam prediction row")
    stored = Image.open(ImageStore(app.data_dir / "images").path(row.image_sha256))
    probs = demo_predictor.predict_probs([stored.convert("RGB")])[0]
    assert demo_predictor.info.vocab[int(np.argmax(probs))] == shown == row.predicted
    assert row.confidence >= 0.8


def test_live_tab_streams_changing_predictions(page, app, digits):
    page.get_by_role("tab", name="Live webcam").click()
    open_camera(page, "live-image")
    page.locator("#live-image button:has([title='start recording'])").click()
    live = page.locator(f"#live-label {TOP}")
    for digit in (*digits, digits[0]):  # the clip alternates: the label must follow it
        expect(live).to_have_text(digit, timeout=TIMEOUT)
    expect(page.locator("#live-info")).to_contain_text(" ms")
    shot(page, "live")
    page.locator("#live-image button:has([title='stop recording'])").click()
    logged = wait_for(lambda: rows(app, source="stream"), what="a logged stream frame")
    assert {r.predicted for r in logged} <= set(digits)


def test_sketchpad_draw_a_one(page, app):
    page.get_by_role("tab", name="Draw").click()
    brush = page.locator("#sketchpad button[aria-label='Brush']")
    expect(brush).to_have_class(re.compile(r"\bhighlight\b"))  # selected for the user on open
    box = page.locator("#sketchpad canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y - 100)
    page.mouse.down()
    page.mouse.move(x, y + 100, steps=8)  # each step repaints a software-GL canvas
    page.mouse.up()
    page.locator("#sketch-submit").click()
    expect(page.locator(f"#draw-prediction-label {TOP}")).to_have_text("1")
    shot(page, "draw")
    wait_for(lambda: rows(app, source="sketch", predicted="1"), what="the sketch prediction row")


def test_each_tab_shows_only_its_own_answer_and_feedback(page):
    page.locator("#upload-image input[data-testid='file-upload']").set_input_files(str(examples()["6"]))
    expect(page.locator(f"#prediction-label {TOP}")).to_have_text("6")
    page.locator("#feedback-yes").click()
    expect(page.locator("#feedback-status")).to_contain_text("Thanks, noted")
    page.get_by_role("tab", name="Webcam", exact=True).click()
    expect(page.locator("#webcam-image")).to_be_visible()
    # no photo taken yet: no answer and no thanks anywhere on the page
    expect(page.locator("#prediction-label")).to_be_hidden()
    expect(page.locator(f"#webcam-prediction-label {TOP}")).to_have_count(0)
    assert "Thanks" not in page.locator("body").inner_text()  # innerText: what is rendered visible
    shot(page, "webcam-before-photo")
    page.get_by_role("tab", name="Upload", exact=True).click()  # the upload's own answer is still there
    expect(page.locator(f"#prediction-label {TOP}")).to_have_text("6")
    expect(page.locator("#feedback-status")).to_contain_text("Thanks, noted")


# The drawing surface's bounding box in the page and the Sketchpad block around it.
CANVAS_JS = """() => { const c = document.querySelector('#sketchpad canvas').getBoundingClientRect();
  const b = document.querySelector('#sketchpad').getBoundingClientRect();
  return {canvas: [c.left, c.top, c.right, c.bottom], block: [b.left, b.top, b.right, b.bottom]}; }"""


def test_canvas_is_whole_and_centred_after_the_live_tab(page, app):
    """The Live tab once hid the shared answer column: the Sketchpad then measured the full page width, its canvas
    stuck out of its block and the drawing surface sat right of centre, its right part cut off."""
    page.get_by_role("tab", name="Live webcam").click()
    expect(page.locator("#live-image")).to_be_visible()
    page.get_by_role("tab", name="Draw").click()
    expect(page.locator("#sketchpad button[aria-label='Brush']")).to_have_class(re.compile(r"\bhighlight\b"))
    geometry = page.evaluate(CANVAS_JS)
    (cl, ct, cr, cb), (bl, bt, br, bb) = geometry["canvas"], geometry["block"]
    assert bl - 0.5 <= cl and cr <= br + 0.5 and bt - 0.5 <= ct and cb <= bb + 0.5, geometry
    assert abs((cl - bl) - (br - cr)) <= 1, geometry  # centred left to right
    # A stroke down the right-hand edge of the drawing surface (280 px, centred in the block; the brush is 22 px).
    x, y = (bl + br) / 2 + 120, (bt + bb) / 2
    before = len(rows(app, source="sketch"))
    page.mouse.move(x, y - 90)
    page.mouse.down()
    page.mouse.move(x, y + 90, steps=8)
    page.mouse.up()
    page.locator("#sketch-submit").click()
    expect(page.locator("#draw-prediction-info")).to_contain_text(" ms")
    shot(page, "draw-after-live")
    row = wait_for(lambda: rows(app, source="sketch")[before:], what="the sketch's row")[-1]
    ink = np.asarray(Image.open(ImageStore(app.data_dir / "images").path(row.image_sha256)).convert("L")) < 128
    height, width = ink.shape
    columns = np.flatnonzero(ink.any(axis=0))
    assert columns.size, "the server got a blank drawing"
    # the stroke reached the server whole, where it was drawn: in the right-hand eighth, not cut off or shifted
    assert columns.min() > 0.8 * width and columns.max() < width - 1, (columns.min(), columns.max(), width)
    ink_rows = np.flatnonzero(ink.any(axis=1))
    assert ink_rows.max() - ink_rows.min() > 0.5 * height


def test_rest_and_gradio_client_on_the_same_server(app):
    from gradio_client import Client, handle_file

    r = httpx.post(app.url + "/api/v1/predict", files={"file": ("9.png", examples()["9"].read_bytes())})
    assert r.status_code == 200 and r.json()["label"] == "9"
    label, _info, details = Client(app.url, verbose=False).predict(handle_file(str(examples()["9"])),
                                                                   api_name="/predict")
    assert label["label"] == "9" == details["label"] and details["prediction_id"]
