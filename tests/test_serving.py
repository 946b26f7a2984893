"""Golden tests: what Loupe serves equals learn.predict, for every kind of export; loading is safe."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.bundle import TOLERANCE, reference_probs
from model.loading import ModelLoadError, load_predictor
from settings import Settings
from tests.learners import golden_images

ROOT = Path(__file__).resolve().parents[1]
EXACT_KINDS = ["rrc224_aug_imagenet", "pad224", "squish224", "crop_nonsquare_96x160", "presize_160to64",
               "presize_rrcgpu_80to64", "bw_48"]


def _learn(path: Path):
    from fastai.learner import load_learner

    return load_learner(path)


def _settings(tmp_path: Path, path: Path, sha: str | None, **kw) -> Settings:
    return Settings(model_path=path, model_sha256=sha, data_dir=tmp_path / "data", **kw)


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_onnx_bundle_matches_learn_predict(kind, exported, tmp_path):
    path, sha = exported(kind)
    predictor = load_predictor(_settings(tmp_path, path, sha))
    assert predictor.info.backend == "onnx", predictor.info.fallback_reason
    # Self-contained: the weights live inside the hashed model.onnx (no unhashed external .data file).
    bundle_dir = tmp_path / "data" / "cache" / sha
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["bundle.json", "model.onnx"]
    learn = _learn(path)
    images = golden_images()
    served = predictor.predict_probs(images)
    expected = reference_probs(learn, images)
    assert served.shape == (len(images), 3)
    assert np.abs(served - expected).max() <= TOLERANCE
    assert list(served.argmax(1)) == list(expected.argmax(1))
    assert predictor.info.vocab == tuple(learn.dls.vocab)


def test_demo_model_matches_learn_predict(demo_predictor):
    from model.demo import DEMO_EXPORT

    assert demo_predictor.info.backend == "onnx"
    assert demo_predictor.info.vocab == tuple(str(i) for i in range(10))
    images = golden_images()
    expected = reference_probs(_learn(DEMO_EXPORT), images)
    assert np.abs(demo_predictor.predict_probs(images) - expected).max() <= TOLERANCE


def test_unreplayable_pipeline_falls_back_to_exact_torch_path(exported, tmp_path):
    path, sha = exported("croppad_fallback")
    predictor = load_predictor(_settings(tmp_path, path, sha))
    assert predictor.info.backend == "torch"
    assert "item transform CropPad" in predictor.info.fallback_reason
    images = golden_images()
    expected = reference_probs(_learn(path), images)
    assert np.abs(predictor.predict_probs(images) - expected).max() <= TOLERANCE


def test_onnx_only_backend_refuses_unreplayable_pipeline(exported, tmp_path):
    path, sha = exported("croppad_fallback")
    with pytest.raises(ModelLoadError, match="cannot be replayed"):
        load_predictor(_settings(tmp_path, path, sha, backend="onnx"))


def test_forced_torch_backend_matches_learn_predict(exported, tmp_path):
    path, sha = exported("rrc224_aug_imagenet")
    predictor = load_predictor(_settings(tmp_path, path, sha, backend="torch"))
    assert predictor.info.backend == "torch"
    images = golden_images()[:4]
    assert np.abs(predictor.predict_probs(images) - reference_probs(_learn(path), images)).max() <= TOLERANCE


def test_batched_answers_equal_single_answers(exported, tmp_path):
    path, sha = exported("pad224")
    predictor = load_predictor(_settings(tmp_path, path, sha))
    images = golden_images()
    batched = predictor.predict_probs(images)
    single = np.concatenate([predictor.predict_probs([im]) for im in images])
    assert np.abs(batched - single).max() <= 1e-5


# --- batch transforms in the graph (presizing), single-channel input, features ------------------------------

RESIZE_CASES = [((460, 460), (224, 224), None),  # the book's presizing: an area pre-pass, then grid_sample
                ((96, 160), (64, 64), None), ((50, 40), (64, 80), None),  # down a little; up (padding matters)
                ((33, 250), (64, 48), None), ((90, 80), (64, 64), [5, 0, 80, 80])]  # odd shapes; a crop first


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("pad_mode", ["reflection", "border", "zeros"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_batch_resize_replays_fastai_affine_coord(mode, pad_mode, align_corners):
    """The graph's batch resize equals fastai's own validation-time affine_coord (identity grid_sample)."""
    import torch
    from fastai.vision.all import TensorImage

    from model.graph import batch_steps_module

    torch.manual_seed(0)
    for (h, w), (ho, wo), crop in RESIZE_CASES:
        x = torch.rand(2, 3, h, w)
        xc = x if crop is None else x[..., crop[0]:crop[0] + crop[2], crop[1]:crop[1] + crop[3]]
        expected = TensorImage(xc).affine_coord(sz=(ho, wo), mode=mode, pad_mode=pad_mode,
                                                align_corners=align_corners).as_subclass(torch.Tensor)
        step = {"op": "resample", "in_size": [h, w], "size": [ho, wo], "mode": mode, "pad_mode": pad_mode,
                "align_corners": align_corners, "crop": crop}
        with torch.inference_mode():
            got = batch_steps_module([step])(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5, ((h, w), (ho, wo), crop)


@pytest.mark.parametrize("kind", ["presize_160to64", "presize_rrcgpu_80to64", "bw_48"])
def test_bundle_records_its_batch_steps(kind, exported, tmp_path):
    from model.bundle import BUNDLE_FORMAT

    path, sha = exported(kind)
    load_predictor(_settings(tmp_path, path, sha))
    meta = json.loads((tmp_path / "data" / "cache" / sha / "bundle.json").read_text())
    assert meta["format"] == BUNDLE_FORMAT == 4
    ops = [(s["op"], s.get("size"), s.get("crop") is not None) for s in meta["graph"]["batch_steps"]]
    assert ops == {"presize_160to64": [("resample", [64, 64], False), ("normalize", None, False)],
                   "presize_rrcgpu_80to64": [("resample", [64, 64], True)],
                   "bw_48": [("normalize", None, False)]}[kind]
    assert meta["spec"]["mode"] == ("L" if kind == "bw_48" else "RGB")


# kind -> the classifier's last Linear (its input is the features) and their width
FEATURE_LAYERS = {"rrc224_aug_imagenet": ("1.8", 512),  # vision_learner head: the hidden layer, not the concat pool
                  "pad224": ("5", 16), "presize_160to64": ("5", 16), "bw_48": ("5", 16)}


@pytest.mark.parametrize("kind", sorted(FEATURE_LAYERS))
def test_onnx_and_torch_features_agree(kind, exported, tmp_path):
    import torch

    path, sha = exported(kind)
    onnx = load_predictor(_settings(tmp_path / "onnx", path, sha))
    exact = load_predictor(_settings(tmp_path / "torch", path, sha, backend="torch"))
    assert (onnx.info.backend, exact.info.backend) == ("onnx", "torch")
    images = golden_images()
    (p_onnx, f_onnx), (p_torch, f_torch) = onnx.predict(images), exact.predict(images)
    layer, dim = FEATURE_LAYERS[kind]
    assert onnx.feature_layer == exact.feature_layer == layer
    assert f_onnx.shape == f_torch.shape == (len(images), dim) and f_onnx.dtype == np.float32
    assert np.abs(f_onnx - f_torch).max() <= 1e-4 * max(1.0, float(np.abs(f_torch).max()))
    assert np.abs(p_onnx - p_torch).max() <= TOLERANCE
    assert np.array_equal(onnx.predict_probs(images), p_onnx)  # the thin wrapper
    # They are the classifier's input: its last Linear applied to them gives the answers.
    last = dict(_learn(path).model.named_modules())[layer]
    with torch.inference_mode():
        probs = torch.softmax(last(torch.from_numpy(f_onnx)), dim=1).numpy()
    assert np.abs(probs - p_onnx).max() <= TOLERANCE


def test_demo_features_are_the_pooled_body(demo_predictor):
    probs, feats = demo_predictor.predict(golden_images()[:3])
    assert demo_predictor.feature_layer == "11" and feats.shape == (3, 128)  # XResNet: pool, flatten, Linear(128)
    assert (feats >= 0).all()  # average-pooled ReLU outputs


def test_cached_bundle_serves_without_importing_torch_or_fastai(exported, tmp_path):
    path, sha = exported("squish224")
    settings = _settings(tmp_path, path, sha)
    first = load_predictor(settings).predict_probs(golden_images()[:2])
    code = (
        "import sys, numpy as np; from settings import Settings; from model.loading import load_predictor;"
        "from tests.learners import golden_images;"
        f"p = load_predictor(Settings(model_path={str(path)!r}, model_sha256={sha!r}, data_dir={str(settings.data_dir)!r}));"
        "np.save(sys.argv[1], p.predict_probs(golden_images()[:2]));"
        "print(sorted(m for m in ('torch', 'fastai') if m in sys.modules), p.info.backend)"
    )
    out = tmp_path / "probs.npy"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[] onnx"
    assert np.abs(np.load(out) - first).max() <= 1e-6


def test_damaged_cached_bundle_is_rebuilt(exported, tmp_path):
    path, sha = exported("squish224")
    settings = _settings(tmp_path, path, sha)
    expected = load_predictor(settings).predict_probs(golden_images()[:2])
    onnx_file = settings.cache_dir / sha / "model.onnx"
    # One self-contained graph: the weights are inside the hashed file, not in an external .data file.
    assert sorted(p.name for p in onnx_file.parent.iterdir()) == ["bundle.json", "model.onnx"]
    onnx_file.write_bytes(onnx_file.read_bytes()[:-100] + b"\0" * 100)
    again = load_predictor(settings)
    assert again.info.backend == "onnx"
    assert np.abs(again.predict_probs(golden_images()[:2]) - expected).max() <= 1e-6


# --- the model file is code: pins, and clear start-up errors ---------------------------------------

class _Boom:
    """Unpickling this runs code: it writes a marker file (what a malicious export could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_unpinned_model_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "export.pkl"
    evil.write_bytes(pickle.dumps(_Boom(str(marker))))
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError) as e:
        load_predictor(_settings(tmp_path, evil, None))
    assert str(evil) in str(e.value) and f"LOUPE_MODEL_SHA256={sha}" in str(e.value)
    with pytest.raises(ModelLoadError, match="its sha256 is"):
        load_predictor(_settings(tmp_path, evil, "ab" * 32))
    assert not marker.exists()


def test_pin_is_checked_against_the_bytes_loaded(exported, tmp_path):
    path, sha = exported("pad224")
    swapped = tmp_path / "export.pkl"
    swapped.write_bytes(path.read_bytes() + b"tampered")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_predictor(_settings(tmp_path, swapped, sha))
    assert load_predictor(_settings(tmp_path, path, sha.upper())).info.sha256 == sha  # pins are case-insensitive


def _pinned(tmp_path: Path, data: bytes) -> Settings:
    p = tmp_path / "export.pkl"
    p.write_bytes(data)
    return _settings(tmp_path, p, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "truncated", "not_a_learner", "multilabel"])
def test_bad_model_file_gives_clear_startup_error(case, exported, tmp_path, color_data):
    import torch

    good, _ = exported("pad224")
    if case == "missing":
        settings = _settings(tmp_path, tmp_path / "nope.pkl", "00" * 32)
        expected = "not found"
    elif case == "empty":
        settings, expected = _pinned(tmp_path, b""), "empty"
    elif case == "garbage":
        settings, expected = _pinned(tmp_path, b"<html>not a model</html>" * 10), "corrupt, truncated"
    elif case == "truncated":
        settings, expected = _pinned(tmp_path, good.read_bytes()[:5000]), "corrupt, truncated"
    elif case == "not_a_learner":
        torch.save({"weights": torch.zeros(3)}, tmp_path / "w.pth")
        settings, expected = _pinned(tmp_path, (tmp_path / "w.pth").read_bytes()), "not a fastai Learner"
    else:
        from tests.learners import build_multilabel_learner

        learn = build_multilabel_learner(color_data)
        learn.export(tmp_path / "ml.pkl")
        settings, expected = _pinned(tmp_path, (tmp_path / "ml.pkl").read_bytes()), "single-label"
    with pytest.raises(ModelLoadError) as e:
        load_predictor(settings)
    assert expected in str(e.value)
    assert str(settings.model_path) in str(e.value)


def test_app_exits_with_the_message_not_a_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LOUPE_MODEL_PATH": str(tmp_path / "missing.pkl"),
           "LOUPE_MODEL_SHA256": "00" * 32, "LOUPE_DATA_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "app.py"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2
    assert "missing.pkl" in res.stderr and "Traceback" not in res.stderr


# --- signed bundles: a tampered or corrupted cache is rebuilt from the export, never served ----------------


def _edit_onnx_weights(onnx_file: Path) -> None:
    """What an attacker would do: change the graph (the last initializer, e.g. the head's bias) and write
    a valid ONNX file in its place."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file))
    last = model.graph.initializer[-1]
    values = numpy_helper.to_array(last).copy()
    values.flat[0] += 10.0
    last.CopyFrom(numpy_helper.from_array(values, last.name))
    onnx.save(model, str(onnx_file))


def _tamper(case: str, bundle_dir: Path, export: Path) -> None:
    from model.bundle import bundle_key, sha256_file, signature

    meta_path = bundle_dir / "bundle.json"
    meta = json.loads(meta_path.read_text())
    if case == "vocab":  # labels swapped: the ONNX hash still matches
        meta["vocab"] = [meta["vocab"][1], meta["vocab"][0], *meta["vocab"][2:]]
    elif case == "spec":  # other preprocessing, same graph
        meta["spec"]["method"] = "pad" if meta["spec"]["method"] != "pad" else "crop"
    elif case == "onnx":  # another graph, with bundle.json's hash fixed up to match it
        _edit_onnx_weights(bundle_dir / "model.onnx")
        meta["onnx_sha256"] = sha256_file(bundle_dir / "model.onnx")
    elif case == "resigned":  # a forger who knows the format but cannot read the export: signs with what it has
        meta["vocab"] = list(reversed(meta["vocab"]))
        meta["signature"] = signature(meta, bundle_key(b"", None))
    elif case == "corrupt":  # one number changed in bundle.json, still valid JSON
        meta["max_error"] = meta["max_error"] * 2
    meta_path.write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize("case", ["vocab", "spec", "onnx", "resigned", "corrupt"])
def test_tampered_bundle_is_rejected(case, exported, tmp_path, caplog):
    from model.bundle import bundle_key, load_bundle

    path, sha = exported("squish224")
    settings = _settings(tmp_path, path, sha)
    load_predictor(settings)
    key = bundle_key(path.read_bytes())
    assert load_bundle(settings.cache_dir, sha, key) is not None  # the untouched bundle verifies
    _tamper(case, settings.cache_dir / sha, path)
    with caplog.at_level("WARNING", logger="model.bundle"):
        assert load_bundle(settings.cache_dir, sha, key) is None
    assert f"cached bundle {settings.cache_dir / sha} fails its signature check" in caplog.text


def test_edited_vocab_is_rebuilt_never_served(exported, tmp_path, caplog):
    path, sha = exported("squish224")
    settings = _settings(tmp_path, path, sha)
    first = load_predictor(settings)
    images = golden_images()[:3]
    expected = first.predict_probs(images)
    _tamper("vocab", settings.cache_dir / sha, path)
    with caplog.at_level("WARNING", logger="model.bundle"):
        again = load_predictor(settings)
    assert "fails its signature check" in caplog.text and "rebuilding" in caplog.text
    assert again.info.backend == "onnx" and again.info.vocab == first.info.vocab
    assert np.abs(again.predict_probs(images) - expected).max() <= 1e-6
    meta = json.loads((settings.cache_dir / sha / "bundle.json").read_text())
    assert meta["vocab"] == list(first.info.vocab)  # rebuilt on disk, not just skipped


def test_bundle_key_setting_signs_the_bundle(exported, tmp_path, caplog):
    from model.bundle import bundle_key, load_bundle

    path, sha = exported("squish224")
    settings = _settings(tmp_path, path, sha, bundle_key="operator secret")
    assert "operator secret" not in repr(settings)
    load_predictor(settings)
    export = path.read_bytes()
    assert load_bundle(settings.cache_dir, sha, bundle_key(export, "operator secret")) is not None
    # Someone with the export but without the operator's secret cannot make a bundle this app accepts.
    with caplog.at_level("WARNING", logger="model.bundle"):
        assert load_bundle(settings.cache_dir, sha, bundle_key(export, None)) is None
        assert load_bundle(settings.cache_dir, sha, bundle_key(export, "another secret")) is None
    assert caplog.text.count("fails its signature check") == 2
