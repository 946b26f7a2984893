"""The review loop in a real browser: log in, decide queued items with the keyboard, check the database;
and check that an anonymous browser gets neither the Review page nor a stored image.

The app runs once per module as a subprocess (tests/browser_support.py) serving a tiny learner exported from class
folders named cat, dog and horse (names without a key of their own: keys by position and by first letter), with
every prediction queued (low-confidence threshold 1.0) so that images POSTed to the REST API become the queue.
(The digits model, whose class names are keys, is tests/test_browser_review_keys.py.)
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from review.auth import hash_password
from review.db import Decision, QueueEntry
from tests.browser_support import start_app
from tests.learners import CLASSES, build_learner, export_learner, make_color_dataset

pytestmark = pytest.mark.slow
NAMED = ("cat", "dog", "horse")  # the colour dataset's classes (CLASSES), renamed
PASSWORD = "review me"
RESULTS = Path(__file__).resolve().parents[1] / "test-results"
TIMEOUT = 30_000  # ms; generous: two cores shared with a model and a database


@pytest.fixture(scope="module")
def named_model(tmp_path_factory) -> tuple:
    data = make_color_dataset(tmp_path_factory.mktemp("named"))
    for colour, name in zip(CLASSES, NAMED, strict=True):
        (data / colour).rename(data / name)
    return export_learner(build_learner("squish224", data), tmp_path_factory.mktemp("named-model"))


@pytest.fixture(scope="module")
def app(tmp_path_factory, named_model):
    model_path, sha = named_model
    root = tmp_path_factory.mktemp("review-browser")
    gradio_cache = root / "gradio-cache"
    env = {
        "LOUPE_MODEL_PATH": str(model_path), "LOUPE_MODEL_SHA256": sha,
        "LOUPE_REVIEWERS": f"alice:{hash_password(PASSWORD, iterations=1000)}",
        "LOUPE_LOW_CONFIDENCE": "1.0", "LOUPE_AUDIT_RATE": "0",
        # our own cache dir, so the test can look at everything Gradio wrote
        "GRADIO_TEMP_DIR": str(gradio_cache),
    }
    proc = start_app(root / "data", env)
    try:
        rng = np.random.default_rng(7)
        for i in range(5):
            arr = rng.integers(0, 256, size=(60 + 10 * i, 80, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            r = httpx.post(proc.url + "/api/v1/predict", files={"file": (f"{i}.png", buf.getvalue(), "image/png")},
                           timeout=60)
            assert r.status_code == 200, r.text
        proc.gradio_cache = gradio_cache
        proc.db = create_engine(f"sqlite:///{root / 'data' / 'loupe.db'}")
        deadline = time.monotonic() + 30
        while len(queued(proc)) < 5:  # the prediction log is written in the background
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.2)
        yield proc
    finally:
        proc.stop()


def queued(app) -> list[QueueEntry]:
    with Session(app.db) as s:
        return list(s.scalars(select(QueueEntry)))


def stored_decisions(app) -> list[tuple[int, str, str, str | None]]:
    with Session(app.db) as s:
        return [(d.item_id, d.reviewer, d.action, d.label) for d in s.scalars(select(Decision).order_by(Decision.id))]


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield context.new_page()
    context.close()


def login(page, url: str) -> None:
    page.goto(url + "/review/")
    page.get_by_label("username").fill("alice")
    page.get_by_label("password").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#review-img")).to_be_visible(timeout=TIMEOUT)


def on_screen(page) -> tuple[int, str]:
    """(item id, predicted class) of the item shown."""
    token = page.locator("#review-token textarea, #review-token input").first.input_value()
    predicted = re.search(r"Model says: (\w+)", page.locator("#review-details").inner_text()).group(1)
    return int(token.split(":")[0]), predicted


# Measured in the page: from the keydown to the moment the next image is in the DOM.
WATCH_JS = """() => {
  window.__shown = null;
  const t0 = performance.now();
  const shown = () => (document.getElementById("review-img") || {}).src || !!document.getElementById("review-empty");
  const before = shown();
  const obs = new MutationObserver(() => {
    if (shown() === before) return;  // e.g. Gradio's progress overlay, not the next item yet
    window.__shown = performance.now() - t0;
    obs.disconnect();
  });
  obs.observe(document.getElementById("review-image"), {subtree: true, childList: true, attributes: true});
}"""


def press(page, key: str, status: str) -> None:
    token = page.locator("#review-token textarea, #review-token input").first
    before = token.input_value()
    page.evaluate(WATCH_JS)
    page.keyboard.press(key)
    expect(token).not_to_have_value(before, timeout=TIMEOUT)
    expect(page.locator("#review-status")).to_contain_text(status, timeout=TIMEOUT)
    print(f"key {key!r}: next image in the page {page.evaluate('window.__shown'):.0f} ms after the key press")


def test_review_named_classes_with_the_keyboard(app, page):
    RESULTS.mkdir(exist_ok=True)
    file_requests: list[str] = []
    page.on("request", lambda r: file_requests.append(r.url) if "file=" in r.url else None)
    login(page, app.url)
    expect(page.locator("#review-counts")).to_contain_text("Open", timeout=TIMEOUT)
    page.screenshot(path=str(RESULTS / "review-tab.png"), full_page=True)

    # the reviewer sees the stored image itself, inline (no URL that could be fetched later)
    src = page.locator("#review-img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    first, predicted1 = on_screen(page)
    # keys typed into a field are text, not shortcuts: this "x" must not mark the item out of domain
    page.locator("#review-filter-predicted input").click()
    page.keyboard.type("x")
    page.locator("#review-details").click()  # leave the field; the next keys are shortcuts again
    shown = hashlib.sha256(base64.b64decode(src.split(",", 1)[1])).hexdigest()
    assert shown == next(q.image_sha256 for q in queued(app) if q.id == first)

    press(page, "Enter", "The model is right")
    second, predicted2 = on_screen(page)
    target = next(c for c in NAMED if c != predicted2)
    position = str(NAMED.index(target) + 1)
    # the hint shows both keys of the class: its position and its first letter
    expect(page.locator("#review-relabel-choice")).to_contain_text(f"{target}  [{position} / {target[0].upper()}]")
    press(page, position, "Relabelled")  # 1 = first class, ...
    third, predicted3 = on_screen(page)
    target3 = next(c for c in reversed(NAMED) if c != predicted3)
    press(page, target3[0], "Relabelled")  # ... or its first letter
    fourth, _ = on_screen(page)
    press(page, "x", "out of domain")

    assert stored_decisions(app) == [(first, "alice", "confirm", predicted1), (second, "alice", "relabel", target),
                                     (third, "alice", "relabel", target3), (fourth, "alice", "out_of_domain", None)]
    assert len({first, second, third, fourth}) == 4
    expect(page.locator("#review-counts")).to_contain_text("by you 4", timeout=TIMEOUT)
    page.screenshot(path=str(RESULTS / "review-tab-after.png"), full_page=True)

    # the other keys: B (bad image) empties the queue, U brings the item back, a double Enter confirms it once
    last, _ = on_screen(page)
    press(page, "b", "bad image")
    expect(page.locator("#review-empty")).to_be_visible(timeout=TIMEOUT)
    press(page, "u", "Undone")
    assert on_screen(page)[0] == last
    page.keyboard.press("Enter")
    page.keyboard.press("Enter")
    expect(page.locator("#review-empty")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator("#review-counts")).to_contain_text("by you 5", timeout=TIMEOUT)
    assert [row[2] for row in stored_decisions(app) if row[0] == last] == ["bad_image", "undo", "confirm"]
    assert file_requests == []
    # What the reviewer saw left no copy in Gradio's cache either (a gr.Image would have put one there, re-encoded
    # as WEBP, reachable through the public app's file route by anyone holding its URL). The seeded images have
    # distinctive sizes, so a copy shows up as a cached image of one of those sizes.
    stored = [p.read_bytes() for p in (app.data_dir / "images").rglob("*.png")]
    stored_sizes = {Image.open(io.BytesIO(b)).size for b in stored}
    cached = [p for p in app.gradio_cache.rglob("*") if p.is_file()] if app.gradio_cache.exists() else []
    assert not [p for p in cached if p.read_bytes() in stored or image_size(p) in stored_sizes]

    # Log out is a POST (a GET link would let any page log reviewers out); the answer sends the browser back to
    # "/review/", the login form. The cookies are HttpOnly, SameSite=Lax: the whole session above ran on them.
    with page.expect_response(lambda r: r.url.endswith("/review/logout") and r.request.method == "POST",
                              timeout=TIMEOUT) as logout:
        page.locator("#review-logout").click()
    assert logout.value.status == 303
    page.wait_for_url(re.compile(r".*/review/?$"), timeout=TIMEOUT)
    expect(page.get_by_label("password")).to_be_visible(timeout=TIMEOUT)
    page.goto(app.url + "/review/")
    expect(page.get_by_label("password")).to_be_visible(timeout=TIMEOUT)
    assert page.request.get(app.url + "/review/config").status == 401


def test_anonymous_browser_gets_the_login_wall(app, page):
    page.goto(app.url + "/review/")
    expect(page.get_by_label("password")).to_be_visible(timeout=TIMEOUT)
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    assert page.locator("#review-image, #review-img, #review-confirm").count() == 0
    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / "review-login-wall.png"))
    r = page.request.get(app.url + "/review/config")
    assert r.status == 401


def test_anonymous_cannot_fetch_a_stored_image(app):
    sha = queued(app)[0].image_sha256
    stored = app.data_dir / "images" / sha[:2] / f"{sha}.png"
    assert stored.exists()
    with httpx.Client(base_url=app.url, timeout=10) as anon:
        for url in (f"/gradio_api/file={stored}", f"/review/gradio_api/file={stored}", f"/file={stored}",
                    f"/review/file={stored}", f"/gradio_api/file/{stored}"):
            r = anon.get(url)
            assert r.status_code in (401, 403, 404), (url, r.status_code)
            assert r.content != stored.read_bytes()


def image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.size
    except OSError:  # not an image (Gradio also caches other files)
        return None
