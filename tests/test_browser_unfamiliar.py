"""The unfamiliar-input warning in a real browser: a photo uploaded to the digits demo gets the warning beside its
answer, a digit does not, and "Not a digit" is offered as feedback. A real ``python app.py``; one browser."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image
from playwright.sync_api import expect

from model.demo import DEMO_EXAMPLES_DIR
from tests.browser_support import RESULTS, launch_args, start_app

pytestmark = pytest.mark.slow
TIMEOUT = 30_000
WARNING = "This doesn't look like the images this model was trained on"


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_predictor, demo_settings):
    root = tmp_path_factory.mktemp("unfamiliar-browser")
    shutil.copytree(demo_settings.cache_dir, root / "data" / "cache")  # the session's converted bundle
    proc = start_app(root / "data")
    try:
        yield proc
    finally:
        proc.stop()


def test_a_photo_gets_the_warning_a_digit_does_not(app, playwright, tmp_path):
    from sklearn.datasets import load_sample_images

    photo = tmp_path / "flower.jpg"
    Image.fromarray(load_sample_images().images[1]).save(photo)
    browser = playwright.chromium.launch(**launch_args())
    try:
        page = browser.new_context(viewport={"width": 1300, "height": 1000}).new_page()
        upload = page.locator("#upload-image input[data-testid='file-upload']")
        info = page.locator("#prediction-info")
        # a digit: an answer without the warning
        page.goto(app.url)
        upload.set_input_files(str(DEMO_EXAMPLES_DIR / "digit_5.png"))
        expect(page.locator("#prediction-label [data-testid='label-output-value']")).to_have_text("5", timeout=TIMEOUT)
        expect(info).to_contain_text("Model digits-demo@", timeout=TIMEOUT)
        expect(info).not_to_contain_text(WARNING)
        # a photo (a fresh page): the warning beside its answer, and "Not a digit" among the feedback choices
        page.goto(app.url)
        upload.set_input_files(str(photo))
        expect(info).to_contain_text(WARNING, timeout=TIMEOUT)
        expect(info).to_contain_text("probably meaningless")
        page.locator("#feedback-label input").click()
        expect(page.get_by_role("option", name="Not a digit (none of these)")).to_be_visible(timeout=TIMEOUT)
        RESULTS.mkdir(exist_ok=True)
        page.screenshot(path=str(RESULTS / "unfamiliar-warning.png"), full_page=True)
    finally:
        browser.close()
