"""First contact with the review, in a real browser, on the demo digits model (issue 7, review items 1-5).

One app (``python app.py`` serving the embedded digits model, every prediction queued) and one browser for the
module. A user claims "3" for an 8 on the public page; a reviewer finds the review from that page, works through
the whole queue with the keyboard at 1280x900, and the decisions table must hold exactly the class of each key.
"""

from __future__ import annotations

import re
import shutil

import httpx
import pytest
from playwright.sync_api import expect
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from review.auth import hash_password
from review.db import Decision, Prediction, QueueEntry
from tests.browser_support import RESULTS, start_app, wait_for
from tests.test_api import examples

pytestmark = pytest.mark.slow
PASSWORD = "review me"
TIMEOUT = 30_000  # ms
VIEWPORT = {"width": 1280, "height": 900}
TOKEN = "#review-token textarea, #review-token input"
# Gradio's marks of a failed event: a toast, and an "Error" badge in the status tracker of every output.
ERROR_MARKS = "[data-testid='toast-body'], [data-testid='status-tracker'] .error"


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_settings, demo_predictor):
    data = tmp_path_factory.mktemp("review-keys") / "data"
    shutil.copytree(demo_settings.cache_dir, data / "cache")  # converted bundle: start-up is just imports
    proc = start_app(data, {"LOUPE_REVIEWERS": f"alice:{hash_password(PASSWORD, iterations=1000)}",
                            "LOUPE_LOW_CONFIDENCE": "1.0", "LOUPE_AUDIT_RATE": "0"})
    try:
        for digit, path in examples().items():
            r = httpx.post(proc.url + "/api/v1/predict", files={"file": (path.name, path.read_bytes(), "image/png")},
                           timeout=60)
            assert r.status_code == 200 and r.json()["label"] == digit, r.text
        proc.db = create_engine(f"sqlite:///{data / 'loupe.db'}")
        wait_for(lambda: len(rows(proc, QueueEntry)) == 10, what="ten queued digits")
        yield proc
    finally:
        proc.stop()


def rows(app, table, **where) -> list:
    with Session(app.db) as s:
        return list(s.scalars(select(table).filter_by(**where).order_by(table.id)))


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    yield page
    context.close()


def in_viewport(page, selector: str) -> None:
    box = page.locator(selector).bounding_box()
    assert box is not None, selector
    assert 0 <= box["y"] and box["y"] + box["height"] <= VIEWPORT["height"], (selector, box)
    assert 0 <= box["x"] and box["x"] + box["width"] <= VIEWPORT["width"], (selector, box)


def test_console_says_where_the_review_and_the_api_docs_are(app):
    port = app.url.rsplit(":", 1)[1]
    log = wait_for(lambda: "API docs:" in app.log() and app.log(), what="the start-up lines")
    assert f"Review: http://127.0.0.1:{port}/review/" in log
    assert f"API docs: http://127.0.0.1:{port}/api/docs" in log
    assert httpx.get(f"{app.url}/api/docs", timeout=10).status_code == 200


def test_the_public_page_leads_to_the_review_login(app, page):
    page.goto(app.url)
    link = page.locator("#review-link")
    expect(link).to_be_visible()
    in_viewport(page, "#review-link")  # at the top, not somewhere below the fold
    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / "predict-review-link.png"))
    link.click()
    page.wait_for_url(re.compile(r".*/review/$"))
    expect(page.get_by_label("password")).to_be_visible()  # the review still wants its login
    assert page.locator("#review-image, #review-confirm").count() == 0
    assert httpx.get(app.url + "/review/config", timeout=10).status_code == 401


def claim_on_the_public_page(app, page, digit: str, claim: str) -> None:
    """A user uploads an example digit and says the right answer is ``claim``."""
    page.goto(app.url)
    page.locator("#upload-image input[data-testid='file-upload']").set_input_files(str(examples()[digit]))
    expect(page.locator("#prediction-label [data-testid='label-output-value']")).to_have_text(digit)
    page.locator("#feedback-label input").click()
    page.get_by_role("option", name=claim, exact=True).click()
    expect(page.locator("#feedback-status")).to_contain_text(f"the right answer is {claim}")
    wait_for(lambda: rows(app, Prediction, claimed_label=claim), what="the claimed label in the database")


def login(page, url: str) -> None:
    page.goto(url + "/review/")
    page.get_by_label("username").fill("alice")
    page.get_by_label("password").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()


def on_screen(page) -> tuple[int, str]:
    token = page.locator(TOKEN).first.input_value()
    predicted = re.search(r"Model says: (\w+)", page.locator("#review-details").inner_text()).group(1)
    return int(token.split(":")[0]), predicted


def press(page, key: str) -> None:
    """Press a key and wait until the next item (or the empty screen) replaced the one decided."""
    token = page.locator(TOKEN).first
    before = token.input_value()
    page.keyboard.press(key)
    expect(token).not_to_have_value(before, timeout=TIMEOUT)


def test_digits_reviewed_with_the_keyboard(app, page):
    claim_on_the_public_page(app, page, "8", "3")
    n = len(rows(app, QueueEntry))
    claimed_item = next(q.id for q in rows(app, QueueEntry)
                        if rows(app, Prediction, image_sha256=q.image_sha256, claimed_label="3"))
    login(page, app.url)
    expect(page.locator("#review-img")).to_be_visible()
    progress = page.locator("#review-progress")
    expect(progress).to_contain_text(f"{n} of {n} left")
    in_viewport(page, "#review-progress")  # k of N left, without scrolling
    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / "review-keys-digits.png"))

    wanted = list("7309512846")  # the keys of the issue first: 7 once recorded "6", 3 recorded "2"
    expected: list[tuple[int, str, str]] = []
    confirmed = False
    while page.locator(TOKEN).first.input_value():
        item, predicted = on_screen(page)
        if item == claimed_item:
            assert predicted == "8"
            expect(page.locator("#review-confirm")).to_have_text("The model is right: 8 [Enter]")
            expect(page.locator("#review-claim")).to_have_text("The user is right: 3 [Shift+Enter]")
            expect(page.locator("#review-relabel-choice")).to_contain_text("3  [3]  · the user's label")
            press(page, "Shift+Enter")
            expected.append((item, "relabel", "3"))
        elif not confirmed:
            expect(page.locator("#review-claim")).to_be_hidden()
            press(page, "Enter")
            expected.append((item, "confirm", predicted))
            confirmed = True
        else:
            key = next(k for k in wanted if k != predicted)
            wanted.remove(key)
            # the hint says what the key does: this class, by its own name
            expect(page.locator("#review-relabel-choice")).to_contain_text(f"{key}  [{key}]")
            press(page, key)
            expected.append((item, "relabel", key))
        left = n - len(expected)
        expect(progress).to_contain_text(f"{left} of {n} left · you decided {len(expected)}")
    got = [(d.item_id, d.action, d.label) for d in rows(app, Decision, reviewer="alice")]
    assert got == expected
    assert {"7", "3"} <= {label for _, action, label in got if action == "relabel"}

    # The queue is empty: a calm screen, and keys pressed now are answered quietly
    expect(page.locator("#review-empty")).to_contain_text("Nothing to review right now")
    for key, wording in (("7", None), ("Enter", "The model is right"), ("x", "out of domain")):
        page.keyboard.press(key)
        if wording:
            expect(page.locator("#review-status")).to_contain_text(wording)
            expect(page.locator("#review-status")).to_contain_text("Nothing to decide")
    expect(page.locator("#review-empty")).to_be_visible()
    expect(progress).to_contain_text(f"0 of {n} left")
    assert page.locator(ERROR_MARKS).count() == 0
    page.screenshot(path=str(RESULTS / "review-keys-empty.png"))
    assert len(rows(app, Decision)) == n  # nothing recorded by the keys on the empty screen
