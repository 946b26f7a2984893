"""Serving a new model version re-scores labelled images at start-up and queues what it contradicts."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, select

from model.demo import DEMO_EXAMPLES_DIR
from model.predictor import ModelInfo
from review.db import Prediction, QueueEntry
from settings import Settings
from tests.browser_support import start_app, wait_for
from tests.review_fixtures import build_kit, upload


def test_new_model_version_rescores_claimed_labels(tmp_path, demo_predictor):
    data = tmp_path / "data"
    settings = Settings(data_dir=data, audit_rate=0.0)
    old = ModelInfo("old-model", "ab" * 32, demo_predictor.info.vocab, "onnx")
    service = build_kit(settings, old)
    three = Image.open(DEMO_EXAMPLES_DIR / "digit_3.png").convert("RGB")
    # The old model was unsure; a user claimed the label "7" for a clear 3.
    service.log(**upload(three), probs=np.full(10, 0.1, dtype=np.float32), source="upload",
                           latency_ms=1.0, claimed_label="7")
    service.store.close()

    app = start_app(data)
    try:
        engine = create_engine(settings.db_url)

        def rescored():
            with engine.connect() as c:
                return c.execute(select(Prediction).where(Prediction.source == "rescore")).first()

        row = wait_for(rescored, timeout=60, what="a rescore prediction")
        assert row.model_version == demo_predictor.info.version
        assert row.claimed_label == "7" and row.predicted == "3"
        with engine.connect() as c:
            entry = c.execute(select(QueueEntry).where(QueueEntry.image_sha256 == row.image_sha256)).one()
        assert entry.high_loss and entry.model_version == demo_predictor.info.version
    finally:
        app.stop()
