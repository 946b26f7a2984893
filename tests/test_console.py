"""What a new user reads in the console on a first start: plain sentences, no raw dicts or maths shorthand."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from model.demo import DEMO_EXAMPLES_DIR, DEMO_NAME, DEMO_SHA256, VOCAB
from model.predictor import ModelInfo
from settings import Settings
from tests.browser_support import start_app, wait_for
from tests.review_fixtures import build_kit, upload


def test_first_start_console_speaks_plainly(tmp_path):
    data = tmp_path / "data"  # empty cache: the model is converted and checked, which is what gets logged
    old = ModelInfo("old-model", "ab" * 32, VOCAB, "onnx")
    kit = build_kit(Settings(data_dir=data, audit_rate=0.0), old)
    three = Image.open(DEMO_EXAMPLES_DIR / "digit_3.png").convert("RGB")
    # a user claimed "7" for a clear 3: the new model re-checks it and queues it (high loss)
    kit.log(**upload(three), probs=np.full(10, 0.1, dtype=np.float32), source="upload", latency_ms=1.0, claimed_label="7")
    kit.store.close()

    app = start_app(data, timeout=300)
    try:
        # the re-check runs in the background once the model is loaded; its line names the "labelled image(s)"
        wait_for(lambda: "labelled image" in app.log(), timeout=120, what="the re-check's console line")
    finally:
        app.stop()
    log = app.log()
    assert re.search(r"Checked the fast serving copy of your model against fastai's own predictions on \d+ test "
                     r"images: they agree to within 0\.0+\d\.", log), log
    demo = ModelInfo(DEMO_NAME, DEMO_SHA256, VOCAB, "onnx")
    assert (f"Re-checked 1 labelled image with the model now serving ({demo.version}); "
            "1 went to the review queue.") in log
    assert "|dp|" not in log and not re.search(r"\{'\w+': ", log), log  # no shorthand, no printed dict
