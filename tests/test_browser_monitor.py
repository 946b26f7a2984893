"""The Monitor tab in a real browser: a reviewer logs in, opens the tab, and sees the drift banner and the plots
(drawn server-side, inline). The app is a real ``python app.py`` on the demo model; one browser for the module."""

from __future__ import annotations

import shutil

import httpx
import pytest
from playwright.sync_api import expect

from model.demo import DEMO_EXAMPLES_DIR
from review.auth import hash_password
from tests.browser_support import RESULTS, launch_args, start_app, wait_for

pytestmark = pytest.mark.slow
PASSWORD = "monitor me"
TIMEOUT = 30_000


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_predictor, demo_settings):
    root = tmp_path_factory.mktemp("monitor-browser")
    # the demo's converted bundle from this session: the app starts without converting again
    shutil.copytree(demo_settings.cache_dir, root / "data" / "cache")
    proc = start_app(root / "data", {"LOUPE_REVIEWERS": f"alice:{hash_password(PASSWORD, iterations=1000)}",
                                     "LOUPE_MONITOR_EVERY_S": "0.5"})
    try:
        for digit in (1, 4, 7):
            data = (DEMO_EXAMPLES_DIR / f"digit_{digit}.png").read_bytes()
            r = httpx.post(proc.url + "/api/v1/predict", files={"file": ("d.png", data, "image/png")}, timeout=60)
            assert r.status_code == 200, r.text
        # the background monitor has looked at them (3 predictions: too few for an alarm)
        wait_for(lambda: httpx.get(proc.url + "/healthz").json()["drift"]["status"] == "insufficient_data",
                 what="a drift check")
        yield proc
    finally:
        proc.stop()


def test_a_reviewer_sees_the_monitor_tab(app, playwright):
    browser = playwright.chromium.launch(**launch_args())
    try:
        page = browser.new_context(viewport={"width": 1300, "height": 1000}).new_page()
        page.goto(app.url + "/review/")
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.get_by_role("tab", name="Monitor").click()
        expect(page.locator("#drift-banner").first).to_contain_text("Not enough recent traffic", timeout=TIMEOUT)
        for plot in ("#plot-traffic", "#plot-latency", "#plot-classes", "#plot-inputs", "#plot-storage"):
            expect(page.locator(plot)).to_be_visible(timeout=TIMEOUT)
        assert page.locator("#plot-traffic").get_attribute("src").startswith("data:image/png;base64,")
        expect(page.locator("#monitor-period")).to_contain_text("3 predictions")
        RESULTS.mkdir(exist_ok=True)
        page.screenshot(path=str(RESULTS / "monitor-tab.png"), full_page=True)
    finally:
        browser.close()
