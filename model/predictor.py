"""Predictors: the object the UI and API call. Loaded once in ``main()`` and passed in.

``OnnxPredictor`` needs only numpy, PIL and onnxruntime (no torch, no fastai import).
``TorchPredictor`` runs the learner's own validation pipeline: the exact fallback for
exports whose preprocessing we cannot replay, or when ONNX conversion fails.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.preprocess import PreprocessSpec, preprocess_batch


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str
    vocab: tuple[str, ...]
    backend: str  # "onnx" | "torch"
    fallback_reason: str | None = None

    @property
    def version(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k(probs_row: np.ndarray, vocab: Sequence[str], k: int) -> dict[str, float]:
    """The k most probable classes, most probable first (the shape ``gr.Label`` takes)."""
    order = np.argsort(-probs_row, kind="stable")[:k]
    return {vocab[i]: float(probs_row[i]) for i in order}


class OnnxPredictor:
    """Serving bundle: ONNX graph of ``learn.model`` + the validation preprocessing as data."""

    def __init__(self, onnx_path: Path, spec: PreprocessSpec, info: ModelInfo, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One intra-op thread by default: on a busy 2-core box more threads were measured up to 6x slower.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.spec = spec
        self.info = info

    def predict_probs(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(self.info.vocab)), dtype=np.float32)
        batch = preprocess_batch(list(images), self.spec)
        (logits,) = self._session.run(None, {self._input: batch})
        return softmax(logits)


class TorchPredictor:
    """The learner's own transforms + a plain forward pass; exact by construction, no DataLoader per call."""

    def __init__(self, learn, info: ModelInfo, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        self._learn = learn
        learn.model.eval()
        self._activation = getattr(learn.loss_func, "activation", None)
        # fastai's transforms keep per-call state (RandTransform.before_call); serialise them.
        self._tfm_lock = threading.Lock()
        self.info = info

    def _inputs(self, images: Sequence[Image.Image]):
        # PNG bytes go through the learner's own type transform (PILImage.create, mode conversion),
        # exactly as learn.predict treats a file.
        items = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            items.append(buf.getvalue())
        with self._tfm_lock:
            dl = self._learn.dls.test_dl(items, bs=len(items), num_workers=0)
            (x,) = dl.one_batch()[:1]
        return x.as_subclass(self._torch.Tensor)  # skip TensorImage's __torch_function__ dispatch

    def predict_probs(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(self.info.vocab)), dtype=np.float32)
        x = self._inputs(images)
        with self._torch.inference_mode():
            out = self._learn.model(x)
            probs = self._activation(out) if self._activation is not None else self._torch.softmax(out, dim=1)
        return probs.float().cpu().numpy()
