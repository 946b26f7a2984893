"""Drift alarms: PSI and its noise floor by hand, the reference file format, and synthetic shifts on the demo model
(darkened, downscaled, one class flooding, a burst of photos, a burst of unfamiliar flags) that must fire while an
unshifted stream of the same size must not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import drift_streams
from model.reference import (
    FORMAT,
    ReferenceError,
    bin_counts,
    find_reference,
    load_reference,
    parse_reference,
    saturation,
)
from review import drift

N = 500  # the default drift window
TH = drift.Thresholds()


# --- pure functions, by hand ------------------------------------------------------------------------------------
def test_psi_by_hand():
    # reference 50/50, window 80/20, pseudo-count 0.5 on every bin of both
    p = [50.5 / 101, 50.5 / 101]
    q = [80.5 / 101, 20.5 / 101]
    expected = (q[0] - p[0]) * math.log(q[0] / p[0]) + (q[1] - p[1]) * math.log(q[1] / p[1])
    assert drift.psi([50, 50], [80, 20]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.40628, abs=1e-4)
    assert drift.psi([10, 20, 30], [10, 20, 30]) == 0.0
    assert drift.psi([10, 20, 30], [20, 40, 60]) == pytest.approx(0.0, abs=1e-3)  # shares, not counts
    # an empty window bin is finite thanks to the pseudo-count: 100/0 vs 50/50
    assert drift.psi([50, 50], [100, 0]) == pytest.approx(
        (100.5 / 101 - 0.5) * math.log(100.5 / 101 / 0.5) + (0.5 / 101 - 0.5) * math.log(0.5 / 101 / 0.5))


def test_noise_floor_follows_the_chi_square_quantile():
    # scipy.stats.chi2.ppf(0.999, dof): 9 -> 27.877, 99 -> 148.23; Wilson-Hilferty is within 1% there
    assert drift.chi2_quantile(9) == pytest.approx(27.877, rel=0.01)
    assert drift.chi2_quantile(99) == pytest.approx(148.23, rel=0.01)
    assert drift.chi2_quantile(1) >= 10.828  # conservative for one degree of freedom
    assert drift.noise_floor(10, 500, 718) == pytest.approx(drift.chi2_quantile(9) * (1 / 500 + 1 / 718))
    assert drift.noise_floor(2, 0, 100) == math.inf


def test_the_floor_keeps_a_many_class_model_from_crying_wolf():
    """100 classes, 200 predictions drawn from the reference's own distribution: PSI is mostly noise (~0.5), far
    above the 0.25 threshold; the noise floor keeps the alarm off. A real flood still fires."""
    rng = np.random.default_rng(0)
    ref = np.full(100, 100)
    same = np.bincount(rng.integers(0, 100, size=200), minlength=100)
    c = drift.check("classes", ref, same, [str(i) for i in range(100)], TH)
    assert c.psi > TH.classes and c.psi < c.floor and c.status == drift.OK
    flood = same.copy()
    flood[0] += 300
    assert drift.check("classes", ref, flood, [str(i) for i in range(100)], TH).status == drift.DRIFT


def test_small_windows_are_insufficient_not_alarms():
    c = drift.check("brightness", [100, 0], [0, 50], ("a", "b"), TH)
    assert c.status == drift.INSUFFICIENT and c.psi is None


def test_bins_clip_and_skip_nan():
    assert bin_counts([0.0, 0.5, 1.0, 7.0, -1.0, np.nan], (0.0, 0.5, 1.0)).tolist() == [2, 3]


def test_saturation_separates_grey_from_colour():
    from PIL import Image

    assert saturation(Image.new("RGB", (50, 50), (120, 120, 120))) == 0.0
    assert saturation(Image.new("RGB", (50, 50), (255, 0, 0))) == 1.0
    assert saturation(Image.new("RGB", (50, 50), (100, 110, 90))) == pytest.approx(20 / 255)


# --- the reference file -----------------------------------------------------------------------------------------
def test_the_demo_ships_its_reference(demo_predictor, tmp_path):
    path = find_reference(tmp_path, demo_predictor.info.sha256)
    # ~97 KB: mostly the unfamiliar-input detector (a 128 x 128 whitening matrix, float32; model/unfamiliar.py)
    assert path is not None and path.stat().st_size < 200_000
    ref = load_reference(path, expect_sha256=demo_predictor.info.sha256)
    assert ref.vocab == demo_predictor.info.vocab
    from model.calibrate import demo_items

    # every held-out digit in its four renderings (both polarities: the demo reads both)
    assert ref.section("predictions")["n"] == ref.section("inputs")["n"] == ref.doc["n_images"] == demo_items()[0]
    assert ref.section("predictions")["accuracy"] > 0.97
    # a file in the data dir wins over the committed one
    own = tmp_path / "models" / demo_predictor.info.sha256 / "reference.json"
    own.parent.mkdir(parents=True)
    own.write_text(path.read_text())
    assert find_reference(tmp_path, demo_predictor.info.sha256) == own


def test_reference_files_are_checked(tmp_path):
    doc = {"format": FORMAT, "version": 1, "model": {"sha256": "a" * 64, "vocab": ["x"]}, "sections": {},
           "n_images": 1}
    assert parse_reference(doc).sha256 == "a" * 64
    with pytest.raises(ReferenceError, match="another model"):
        parse_reference(doc, expect_sha256="b" * 64)
    with pytest.raises(ReferenceError, match="format version 2"):
        parse_reference({**doc, "version": 2})
    with pytest.raises(ReferenceError, match="not a Loupe reference"):
        parse_reference({"version": 1})
    bad = tmp_path / "reference.json"
    bad.write_text("{not json")
    with pytest.raises(ReferenceError, match="not valid JSON"):
        load_reference(bad)
    # sections it does not know are kept (e.g. a newer detector's), and read back as they were
    bad.write_text(json.dumps({**doc, "sections": {"unfamiliar": {"reference_rate": 0.05}}}))
    assert load_reference(bad).section("unfamiliar") == {"reference_rate": 0.05}


# --- synthetic shifts through the demo model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_reference(demo_predictor, tmp_path_factory):
    return load_reference(find_reference(tmp_path_factory.mktemp("ref"), demo_predictor.info.sha256))


@pytest.fixture(scope="module")
def windows(demo_predictor):
    pool = drift_streams.digit_pool()
    return {kind: drift_streams.window(demo_predictor, drift_streams.stream(kind, pool, N, seed=1))
            for kind in drift_streams.SHIFTS}


def _table(checks_by_stream: dict) -> str:
    names = [c.name for c in next(iter(checks_by_stream.values()))]
    lines = ["stream      " + "".join(f"{n:>12}" for n in names)]
    for kind, checks in checks_by_stream.items():
        lines.append(f"{kind:<12}" + "".join(f"{c.psi:>11.3f}{'*' if c.status == drift.DRIFT else ' '}"
                                             for c in checks))
    return "\n".join(lines)


EXPECTED = {"darkened": {"brightness"}, "downscaled": {"resolution"}, "flooding": {"classes"},
            "photos": {"greyscale"}}


def test_shifts_fire_and_the_unshifted_stream_does_not(demo_reference, windows):
    results = {kind: drift.compare(demo_reference, w, TH) for kind, w in windows.items()}
    print("\nPSI per check (* = alarm), windows of", N, "predictions\n" + _table(results))
    assert all(len(w) == N for w in windows.values())
    fired = {kind: {c.name for c in checks if c.status == drift.DRIFT} for kind, checks in results.items()}
    assert fired["unshifted"] == set(), _table(results)
    for kind, must in EXPECTED.items():
        assert must <= fired[kind], f"{kind}: expected {must} among the alarms, got {fired[kind]}\n{_table(results)}"
    # the unshifted stream is well inside every threshold, not just under it
    assert max(c.psi for c in results["unshifted"]) < 0.5 * TH.inputs, _table(results)


def test_a_burst_of_unfamiliar_flags_fires(demo_reference, windows):
    """With the detector's section in the reference (it flags 5% of reference images), 30% flagged fires; the
    reference's own 5% does not."""
    doc = dict(demo_reference.doc)
    doc["sections"] = {**doc["sections"], "unfamiliar": {"reference_rate": 0.05, "n": 718}}
    ref = parse_reference(doc)
    base = windows["unshifted"]
    rng = np.random.default_rng(3)

    def with_flags(rate: float) -> drift.Window:
        flags = (rng.random(len(base)) < rate).astype(float)
        return drift.Window(base.predicted, base.confidence, base.width, base.height, base.brightness,
                            base.saturation, flags)

    calm = {c.name: c for c in drift.compare(ref, with_flags(0.05), TH)}["unfamiliar"]
    burst = {c.name: c for c in drift.compare(ref, with_flags(0.30), TH)}["unfamiliar"]
    print(f"\nunfamiliar PSI: 5% flagged {calm.psi:.3f}, 30% flagged {burst.psi:.3f}")
    assert calm.status == drift.OK and burst.status == drift.DRIFT
    assert drift.unfamiliar_rate(with_flags(0.30)) == pytest.approx(0.3, abs=0.05)
    # without flags in the window (no detector yet) there is no such check at all
    assert "unfamiliar" not in {c.name for c in drift.compare(ref, base, TH)}


# --- python -m model.calibrate on a user's own learner ------------------------------------------------------------
def test_calibrate_a_users_learner(exported, color_data, tmp_path, monkeypatch, capsys):
    from model import calibrate
    from model.reference import reference_path

    path, sha = exported("squish224")
    for var in ("LOUPE_DATABASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOUPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOUPE_MODEL_PATH", str(path))
    monkeypatch.setenv("LOUPE_MODEL_SHA256", sha)
    assert calibrate.main([str(tmp_path / "missing")]) == 2
    assert "neither a folder of class folders nor a labels.csv" in capsys.readouterr().err

    assert calibrate.main([str(color_data), "--limit", "12"]) == 0
    out = capsys.readouterr()
    assert "calibrate" in out.err and "written to" in out.err
    ref = load_reference(reference_path(tmp_path / "data", sha), expect_sha256=sha)
    assert json.loads(out.out)["images"] == ref.doc["n_images"] == 12  # --limit: a fixed sample
    preds, inputs = ref.section("predictions"), ref.section("inputs")
    assert sum(preds["class_counts"].values()) == sum(preds["label_counts"].values()) == 12
    assert set(preds["label_counts"]) <= {"blue", "green", "red"} and preds["accuracy"] is not None
    assert inputs["greyscale"] == {"threshold": 0.04, "grey": 0, "colour": 12}  # colour images
    assert sum(inputs["resolution"]["counts"]) == sum(inputs["aspect"]["counts"]) == 12
    # the same sample on every run: the file only changes by its creation time
    first = ref.doc
    assert calibrate.main([str(color_data), "--limit", "12"]) == 0
    again = load_reference(reference_path(tmp_path / "data", sha)).doc
    assert {**again, "created": None} == {**first, "created": None}
