"""Serving bundles: a trusted export converted once into ONNX + a JSON spec, cached by the export's sha256.

Layout: ``<cache_dir>/<export sha256>/{model.onnx, bundle.json}``. ``model.onnx`` is the serving graph
(model/graph.py: the validation-time batch transforms, then ``learn.model``; outputs ``logits`` and
``features``). ``bundle.json`` holds the per-image preprocessing spec, the batch steps and feature layer baked
into the graph (for readers; the graph is what runs), the vocab, the ONNX file's own sha256 (checked on every
load) and the verification result. A bundle is only written after its answers matched ``learn.predict`` on
probe images.

Signed bundles. What is trusted: the export, once its sha256 is pinned, and the operator's environment.
What is not: the cache dir. The app writes it, so anyone else who can (a shared volume, a restored backup,
another container, a disk that corrupts) could swap the vocab or the preprocessing spec and make the app
serve wrong labels, or swap model.onnx and fix up the hash next to it. So ``bundle.json`` carries an
HMAC-SHA256 over its canonical bytes (vocab, spec, export sha256 and model.onnx's sha256, hence the graph
too), and a bundle whose signature does not verify is rebuilt from the export, never served.

The key is ``HMAC(LOUPE_BUNDLE_KEY, export bytes)`` (``bundle_key``): derived from the two trusted things,
stored nowhere. Without ``LOUPE_BUNDLE_KEY`` a forger must be able to read the model file as well as write
the cache (a model baked into an image, a cache on a shared volume: still safe); with it, only the
operator's environment can sign. Corruption and hand edits are caught either way. Rejected: a digest
stored beside the bundle (rewritten along with it); a random key in the data dir (same trust as the cache,
and every copy of a cache would be rebuilt); re-checking against ``learn.predict`` at every start (imports
torch and fastai and unpickles: the ~10 s the cache exists to save).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.preprocess import PreprocessSpec

log = logging.getLogger(__name__)
# 4: batch transforms (resize, Normalize) inside the graph, 1-channel inputs, a `features` output;
# 3: bundle.json signed; 2: weights inside model.onnx (1: in an unhashed .data file)
BUNDLE_FORMAT = 4
TOLERANCE = 1e-4  # max |p_served - p_learn.predict| accepted, per class


class BundleError(Exception):
    """Conversion or verification failed; the message is the logged fallback reason."""


@dataclass(frozen=True)
class Bundle:
    onnx_path: Path
    spec: PreprocessSpec
    vocab: tuple[str, ...]
    max_error: float
    graph: dict  # {"batch_steps": [...], "features": {"layer": name, "dim": D} | None}

    @property
    def feature_layer(self) -> str | None:
        return (self.graph.get("features") or {}).get("layer")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_key(export_bytes: bytes, secret: str | None = None) -> bytes:
    """The key that signs this export's bundle (module docstring): nothing an attacker can find in the cache."""
    mac = hmac.new((secret or "").encode(), b"loupe serving bundle\0", hashlib.sha256)
    mac.update(export_bytes)
    return mac.digest()


def signature(meta: dict, key: bytes) -> str:
    """HMAC over bundle.json's canonical form (sorted keys, no whitespace), its own signature left out."""
    body = {k: v for k, v in meta.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def load_bundle(cache_dir: Path, export_sha256: str, key: bytes) -> Bundle | None:
    """The cached bundle for this export, or None if absent, outdated, unsigned or damaged (then it is rebuilt)."""
    d = cache_dir / export_sha256
    meta_path, onnx_path = d / "bundle.json", d / "model.onnx"
    if not (meta_path.is_file() and onnx_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != BUNDLE_FORMAT:
            log.info("cached bundle %s has format %s (now %d); rebuilding", d, meta.get("format"), BUNDLE_FORMAT)
            return None
        if not hmac.compare_digest(str(meta.get("signature")), signature(meta, key)):
            log.warning("cached bundle %s fails its signature check (edited, corrupted, or signed with another "
                        "LOUPE_BUNDLE_KEY); rebuilding it from the export", d)
            return None
        if meta["export_sha256"] != export_sha256:  # signed, but for another export (a renamed directory)
            log.warning("cached bundle %s belongs to export %s; rebuilding", d, meta["export_sha256"])
            return None
        if sha256_file(onnx_path) != meta["onnx_sha256"]:
            log.warning("cached bundle %s is damaged (ONNX hash mismatch); rebuilding", d)
            return None
        return Bundle(onnx_path, PreprocessSpec.from_dict(meta["spec"]), tuple(meta["vocab"]), meta["max_error"],
                      meta["graph"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning("cached bundle %s is unreadable (%s); rebuilding", d, e)
        return None


def probe_images(seed: int = 0) -> list[Image.Image]:
    """Images of awkward sizes and content used to check a bundle against learn.predict."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (301, 199), (120, 333), (17, 5), (640, 480), (1, 1), (3, 97)]
    out = []
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
        noise = rng.integers(0, 64, size=(h, w, 3))
        arr = np.clip(base + noise * (i % 2), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


def reference_probs(learn, images: list[Image.Image]) -> np.ndarray:
    """What learn.predict answers for each image (fed as PNG bytes, exactly like a file)."""
    rows = []
    with learn.no_bar():
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            rows.append(np.asarray(learn.predict(buf.getvalue())[2], dtype=np.float32))
    return np.stack(rows)


def _export_onnx(learn, spec: PreprocessSpec, steps: list[dict], path: Path) -> dict | None:
    """Export the serving graph; returns its feature layer ({"layer", "dim"}) or None (no ``features`` output)."""
    import torch

    from model.graph import FEATURES, batch_steps_module, find_feature_layer, serving_graph

    model = copy.deepcopy(learn.model).cpu().eval()
    x = torch.zeros(2, 1 if spec.mode == "L" else 3, spec.size[1], spec.size[0])
    with torch.inference_mode():
        found = find_feature_layer(model, batch_steps_module(steps)(x))
    graph = serving_graph(model, steps, found[0] if found else None).eval()
    # The exporter prints (and logs at INFO) pages of diagnostics; keep them out of the user's console.
    noisy = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.WARNING)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
            warnings.catch_warnings():
        # The feature hook keeps its tensor in a plain list on purpose (model/graph.py); torch.export warns.
        warnings.filterwarnings("ignore", message="The tensor attribute")
        try:
            torch.onnx.export(
                graph, (x,), str(path), input_names=["input"], output_names=["logits"] + ([FEATURES] if found else []),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256)},), dynamo=True,
                external_data=False,  # weights inside model.onnx, so the bundle's onnx_sha256 covers them
            )
        finally:
            for lg, level in zip(noisy, levels, strict=True):
                lg.setLevel(level)
    return {"layer": found[0], "dim": found[1]} if found else None


def build_bundle(learn, export_sha256: str, cache_dir: Path, vocab: list[str], key: bytes, plan=None) -> Bundle:
    """Convert, verify against learn.predict, sign, then publish atomically into the cache. Raises BundleError."""
    from model.graph import describe
    from model.predictor import ModelInfo, OnnxPredictor, ThreadPlan
    from model.spec import Unsupported, extract_spec

    try:
        spec, steps = extract_spec(learn)
    except Unsupported as e:
        raise BundleError(f"preprocessing cannot be replayed outside fastai: {e}") from e
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{export_sha256[:12]}-", dir=cache_dir))
    try:
        onnx_path = tmp / "model.onnx"
        try:
            features = _export_onnx(learn, spec, steps, onnx_path)
        except Exception as e:  # noqa: BLE001 - any exporter failure means "use the torch path", with its reason
            raise BundleError(f"ONNX export failed: {type(e).__name__}: {str(e)[:300]}") from e
        images = probe_images()
        info = ModelInfo("probe", export_sha256, tuple(vocab), "onnx")
        served = OnnxPredictor(onnx_path, spec, info, plan or ThreadPlan()).predict_probs(images)
        expected = reference_probs(learn, images)
        if served.shape != expected.shape:
            raise BundleError(f"ONNX output shape {served.shape} differs from learn.predict's {expected.shape}")
        err = float(np.abs(served - expected).max())
        if not err <= TOLERANCE:
            raise BundleError(f"ONNX answers differ from learn.predict by {err:.2e} (> {TOLERANCE:g})")
        meta = {
            "format": BUNDLE_FORMAT, "export_sha256": export_sha256, "onnx_sha256": sha256_file(onnx_path),
            "spec": json.loads(spec.to_json()), "vocab": list(vocab), "max_error": err,
            "graph": {"batch_steps": steps, "features": features},
        }
        meta["signature"] = signature(meta, key)
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=1))
        final = cache_dir / export_sha256
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        log.info("Checked the fast serving copy of your model against fastai's own predictions on %d test images: "
                 "they agree to within %s. Saved in %s, so later starts skip this step.", len(images),
                 np.format_float_positional(err, precision=1, unique=False, fractional=False, trim="-"), final)
        log.debug("bundle %s: max |served - learn.predict| = %.3e over %d probe images; batch steps in the graph: %s; "
                  "features: %s", final, err, len(images), describe(steps),
                  f"{features['dim']} from layer {features['layer']}" if features else "none")
        return Bundle(final / "model.onnx", spec, tuple(vocab), err, meta["graph"])
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
