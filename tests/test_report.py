"""``python -m review report``: ONE self-contained HTML file (no URL, no script, every image inline) with every
string escaped, for a model whose name and classes are hostile HTML."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from model.predictor import ModelInfo
from model.reference import compute_reference, reference_path, save_reference
from review.__main__ import main
from tests import review_fixtures as rf
from tests.review_fixtures import FakePredictor, probs, upload

NASTY = ModelInfo(name='<script>alert("x")</script>', sha256="cd" * 32,
                  vocab=("<b>cat</b>", "dog&co", '"><svg onload=alert(1)>'), backend="onnx")


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_DATA_DIR", str(tmp_path / "data"))
    for var in ("LOUPE_DATABASE_URL", "DATABASE_URL", "LOUPE_MODEL_PATH", "LOUPE_MODEL_SHA256"):
        monkeypatch.delenv(var, raising=False)
    settings = rf.make_settings(tmp_path, f"sqlite:///{(tmp_path / 'data' / 'loupe.db').resolve()}", audit_rate=1.0)
    kit = rf.build_kit(settings, NASTY)
    rng = np.random.default_rng(0)
    for i in range(30):
        kit.log(**upload(rf.square((8 * i, 100, 200), size=48, mark=i + 1)), probs=probs(*rng.dirichlet([9, 1, 1])),
                source="upload" if i % 2 else "api", latency_ms=float(i))
    kit.store.flush()
    item = kit.desk.next_item("alice")
    kit.desk.decide("alice", item.item_id, action="relabel", label="dog&co", idempotency_key="k")
    # its reference: the same kind of squares, through a stand-in model
    fake = FakePredictor(NASTY, lambda images: np.tile([0.6, 0.3, 0.1], (len(images), 1)))
    doc = compute_reference(fake, ((rf.square((5 * i, 100, 200), size=48), None) for i in range(40)), source="test")
    save_reference(doc, reference_path(settings.data_dir, NASTY.sha256))
    kit.store.close()
    return tmp_path


def test_the_report_is_one_self_contained_escaped_file(data, capsys):
    out = data / "report.html"
    assert main(["report", "--since", "2020-01-01", "--out", str(out), "--version", NASTY.version]) == 0
    assert '"predictions": 30' in capsys.readouterr().out
    text = out.read_text()
    # self-contained: no URL of any kind, no script, no stylesheet link, no frame; images are inline PNGs
    srcs = re.findall(r'src="([^"]*)"', text)
    outside_images = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]*"', "", text)
    found = re.search(r"https?:|//|<script|<link|<iframe|<object|<embed|url\(|@import|src=|href=", outside_images,
                      re.I)
    assert found is None, outside_images[max(0, found.start() - 80):found.end() + 80]
    assert len(srcs) >= 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    # escaped: the hostile name and classes appear only as text
    assert "<b>cat</b>" not in text and "<svg" not in text and '<script>alert("x")' not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "&lt;b&gt;cat&lt;/b&gt;" in text  # the agreement table's row
    for plot in ("plot-traffic", "plot-classes", "plot-inputs", "plot-accuracy", "plot-confusion", "plot-latency"):
        assert f'id="{plot}"' in text, plot
    assert "drift-banner" in text and "drift-table" in text


@pytest.mark.parametrize("argv, message", [
    (["--since", "2026-02-01", "--until", "2026-01-01"], "--until must be after --since"),
    (["--since", "2026-01-01", "--version", "nobody@000000000000"], "unknown model version"),
])
def test_report_mistakes_are_clear(data, capsys, argv, message):
    assert main(["report", "--out", str(data / "r.html"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (data / "r.html").exists()
