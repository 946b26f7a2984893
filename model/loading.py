"""Load the served model once, safely: the model file is code.

``load_learner`` unpickles, so a model file can run arbitrary code. We read the file's bytes once,
check their sha256 against a pin, and unpickle *those* bytes (never re-reading the path, which could
have changed in between). With a cached serving bundle for that sha256 we never unpickle at all.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from model.bundle import BundleError, build_bundle, bundle_key, load_bundle
from model.predictor import ModelInfo, OnnxPredictor, ThreadPlan, TorchPredictor

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """Start-up failure; the message names the file and says what to do."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    sha256_pin: str | None
    name: str


def model_source(settings) -> ModelSource:
    if settings.model_path is None:
        from model.demo import DEMO_EXPORT, DEMO_NAME, DEMO_SHA256

        return ModelSource(DEMO_EXPORT, DEMO_SHA256, DEMO_NAME)
    path = Path(settings.model_path)
    return ModelSource(path, settings.model_sha256, settings.model_name or path.stem)


def read_pinned(src: ModelSource) -> tuple[bytes, str]:
    """The file's bytes and sha256, refusing anything that does not match the pin."""
    try:
        data = src.path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(f"Model file not found: {src.path}. Set LOUPE_MODEL_PATH to your export.pkl "
                             "(made with learn.export()), or unset it to serve the demo model.") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ModelLoadError(f"Cannot read model file {src.path}: {e.strerror}.") from None
    digest = hashlib.sha256(data).hexdigest()
    if not src.sha256_pin:
        raise ModelLoadError(
            f"Refusing to load {src.path}: loading a fastai export runs code from the file, so Loupe only loads "
            f"files whose sha256 is pinned. If you trust this file, set LOUPE_MODEL_SHA256={digest}")
    if digest != src.sha256_pin.strip().lower():
        raise ModelLoadError(
            f"Refusing to load {src.path}: its sha256 is {digest}, but LOUPE_MODEL_SHA256 pins "
            f"{src.sha256_pin}. The file changed or is not the one you meant; re-check it, then update the pin.")
    return data, digest


def unpickle_learner(data: bytes, path: Path):
    """What fastai's load_learner does, on bytes already verified; every failure is a clear ModelLoadError."""
    import pickle

    if len(data) == 0:
        raise ModelLoadError(f"Model file {path} is empty. Re-export it with learn.export().")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai/torch import-time FutureWarnings are not the user's business
        import torch
        from fastai.learner import Learner

        try:
            learn = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, UnboundLocalError) as e:
            raise ModelLoadError(
                f"Model file {path} is corrupt, truncated or not a fastai export ({type(e).__name__}: "
                f"{str(e)[:200]}). Re-export it with learn.export() using fastai 2.8.") from None
        except (AttributeError, ImportError) as e:
            raise ModelLoadError(
                f"Model file {path} refers to code that is not importable here ({str(e)[:300]}). Functions "
                "used by your DataBlock (e.g. a label function) must live in an importable module.") from None
    if not isinstance(learn, Learner):
        raise ModelLoadError(f"Model file {path} holds a {type(learn).__name__}, not a fastai Learner. "
                             "Export the whole learner with learn.export(), not just its weights.")
    # The rest of fastai's load_learner(cpu=True): CPU data loaders, fp32 weights.
    learn.dls.cpu()
    if hasattr(learn, "channels_last"):
        learn = learn.to_contiguous(to_fp32=True)
    elif hasattr(learn, "mixed_precision"):
        learn = learn.to_fp32()
    elif hasattr(learn, "non_native_mixed_precision"):
        learn = learn.to_non_native_fp32()
    return learn


def load_predictor(settings, source: ModelSource | None = None):
    """Pin check, then a cached ONNX bundle if there is one, else convert (or fall back to torch).

    ``source``: another pinned file than the settings' model (a registered version: model.versions)."""
    from model.spec import NotAClassifier, check_classifier

    src = source or model_source(settings)
    data, digest = read_pinned(src)
    plan = ThreadPlan.from_settings(settings)
    # Signs and checks the cached bundle (model/bundle.py): from the pinned bytes and the operator's secret.
    key = bundle_key(data, settings.bundle_key.get_secret_value() if settings.bundle_key else None)
    if settings.backend != "torch":
        bundle = load_bundle(settings.cache_dir, digest, key)
        if bundle is not None:
            info = ModelInfo(src.name, digest, bundle.vocab, "onnx")
            return OnnxPredictor(bundle.onnx_path, bundle.spec, info, plan, bundle.feature_layer)

    log.info("loading %s (first start with this model: converting it for fast serving)", src.path)
    learn = unpickle_learner(data, src.path)
    try:
        vocab = check_classifier(learn)
    except NotAClassifier as e:
        raise ModelLoadError(f"Model file {src.path} cannot be served: {e}.") from None
    reason = "LOUPE_BACKEND=torch"
    if settings.backend != "torch":
        try:
            bundle = build_bundle(learn, digest, settings.cache_dir, vocab, key, plan)
            return OnnxPredictor(bundle.onnx_path, bundle.spec, ModelInfo(src.name, digest, tuple(vocab), "onnx"),
                                 plan, bundle.feature_layer)
        except BundleError as e:
            if settings.backend == "onnx":
                raise ModelLoadError(f"Model file {src.path}: {e}. Unset LOUPE_BACKEND to allow the torch path.") \
                    from None
            reason = str(e)
            log.warning("serving %s through torch (exact, slower): %s", src.path, reason)
    predictor = TorchPredictor(learn, ModelInfo(src.name, digest, tuple(vocab), "torch", reason), plan)
    _check_torch_path(learn, predictor, src.path)
    return predictor


def _check_torch_path(learn, predictor, path: Path) -> None:
    """Even the exact path is checked once: a model whose outputs are not class probabilities is refused."""
    import numpy as np

    from model.bundle import TOLERANCE, probe_images, reference_probs

    images = probe_images()[:2]
    served, expected = predictor.predict_probs(images), reference_probs(learn, images)
    if served.shape != expected.shape or served.shape[1] != len(predictor.info.vocab):
        raise ModelLoadError(f"Model file {path} answers with {served.shape[1]} outputs for "
                             f"{len(predictor.info.vocab)} classes; it is not a classifier Loupe can serve.")
    if not np.allclose(served.sum(axis=1), 1, atol=1e-3) or np.abs(served - expected).max() > TOLERANCE:
        raise ModelLoadError(f"Model file {path}: its outputs are not single-label class probabilities "
                             "matching learn.predict; Loupe refuses to serve wrong answers.")
