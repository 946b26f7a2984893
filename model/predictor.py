"""Predictors: the object the UI and API call. Loaded once in ``main()`` and passed in.

``OnnxPredictor`` needs only numpy, PIL and onnxruntime (no torch, no fastai import).
``TorchPredictor`` runs the learner's own validation pipeline: the exact fallback for
exports whose preprocessing we cannot replay, or when ONNX conversion fails.

Both answer ``predict(images) -> (probs, features)``: class probabilities (N, classes) in vocab order, and the
features (N, D) the classifier's last nn.Linear takes (model/graph.py says which layer and why), or None when
the model has no such layer. ``predict_probs`` is the probabilities alone. For cross-request batching
(serving/batcher.py) the work is split in two: ``prepare(images)`` (decode-side work, in the caller's thread)
and ``run(batch, alone)`` (the forward pass; ``alone``: nothing else is running or waiting, use every thread).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.preprocess import PreprocessSpec, preprocess_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPlan:
    """How model work uses the cores. Measured on a 2-core box (bench/README.md, "Threads and batching"):
    a forward that runs alone is fastest with every core (resnet34 @224: 38 ms at 2 threads, 66 ms at 1), but
    under load, batches on 1-thread sessions side by side out-run one 2-thread session (no barrier waits
    between the threads, and a busy box can make 2 threads slower than 1). So a batch runs on ``threads``
    threads when it is alone (the only prediction in flight), else on one of ``lanes`` lanes side by side, each
    on ``lane_threads`` threads (one ORT session serves them all; serving/batcher.py decides)."""

    threads: int = 1  # LOUPE_INTRA_OP_THREADS, default: every core
    lanes: int = 1  # LOUPE_MODEL_WORKERS, default: one per core
    lane_threads: int = 1  # threads // lanes, at least 1

    @classmethod
    def from_settings(cls, settings, cores: int | None = None) -> ThreadPlan:
        cores = cores or usable_cores()
        threads = settings.intra_op_threads or cores
        lanes = settings.model_workers or cores
        return cls(threads, lanes, max(1, threads // lanes))


def usable_cores() -> int:
    """Cores this process may run on (a cpuset narrows it; a CPU quota does not: set the settings there)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
    """Serving bundle: an ONNX graph (batch transforms + ``learn.model``, model/graph.py) + the per-image
    preprocessing as data (model/preprocess.py)."""

    def __init__(self, onnx_path: Path, spec: PreprocessSpec, info: ModelInfo, plan: ThreadPlan = ThreadPlan(),
                 feature_layer: str | None = None):
        self.spec = spec
        self.info = info
        self.plan = plan
        self._alone = _session(onnx_path, plan.threads, spin=True)
        self._lane = self._alone
        self._lane_ready = threading.Event()
        if plan.lane_threads == plan.threads:
            self._lane_ready.set()
        else:
            # Lanes only run under load: their session is built beside the start-up (ORT releases the GIL
            # meanwhile), not before the server may answer; a first lane run waits for it.
            threading.Thread(target=self._build_lane, args=(onnx_path, plan.lane_threads), name="ort-lane-session",
                             daemon=True).start()
        self._input = self._alone.get_inputs()[0].name
        outputs = [o.name for o in self._alone.get_outputs()]
        self._outputs = outputs[:2]
        self.has_features = len(outputs) > 1
        self.feature_layer = feature_layer if self.has_features else None

    def _build_lane(self, onnx_path: Path, threads: int) -> None:
        try:
            self._lane = _session(onnx_path, threads, spin=False)
        except Exception:  # noqa: BLE001 - the file loaded a moment ago; lanes can still share the other session
            log.exception("could not build the %d-thread lane session; lanes use the %d-thread session",
                          threads, self.plan.threads)
        finally:
            self._lane_ready.set()

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
        return preprocess_batch(list(images), self.spec)

    def run(self, batch: np.ndarray, alone: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        if not alone:
            self._lane_ready.wait()
        out = (self._alone if alone else self._lane).run(self._outputs, {self._input: batch})
        return softmax(out[0]), (out[1] if self.has_features else None)

    def predict(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        if not images:
            return np.zeros((0, len(self.info.vocab)), dtype=np.float32), None
        return self.run(self.prepare(images))

    def predict_probs(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.predict(images)[0]


def _session(onnx_path: Path, threads: int, spin: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Pool threads spin between the ~50 operators of one run (each hand-over then costs no wake-up: resnet34,
    # 2 threads: 36.5 ms spinning vs 40.2 ms sleeping), and stop spinning the moment the run returns, so an
    # idle server burns nothing. Only the session that runs alone spins: beside a second lane, spinning
    # threads would take the CPU the other lane and the requests' own threads (decoding, logging) need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


class TorchPredictor:
    """The learner's own transforms + a plain forward pass; exact by construction, no DataLoader per call.

    torch's thread pool is process-wide, so forwards run one at a time on ``plan.threads`` threads (``alone``
    changes nothing here); the learner's transforms run in the callers' threads, under their own lock."""

    def __init__(self, learn, info: ModelInfo, plan: ThreadPlan = ThreadPlan()):
        import torch

        torch.set_num_threads(plan.threads)
        self._torch = torch
        self._learn = learn
        learn.model.eval()
        self._activation = getattr(learn.loss_func, "activation", None)
        # fastai's transforms keep per-call state (RandTransform.before_call); serialise them.
        self._tfm_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one forward at a time
        self.info = info
        self.plan = plan
        # The feature hook records only inside run(), for that thread (learn.predict elsewhere must not mix in).
        self._local = threading.local()
        self.feature_layer = self._hook_features()
        self.has_features = self.feature_layer is not None

    def _hook_features(self) -> str | None:
        from model.graph import find_feature_layer

        try:
            # prepare() converts to the learner's own mode (PNG bytes through its type transform).
            found = find_feature_layer(self._learn.model,
                                       self._torch.from_numpy(self.prepare([Image.new("RGB", (64, 64))])))
        except Exception as e:  # noqa: BLE001 - the exact path must serve even where the features cannot be found
            log.warning("no features output for %s: a probe forward pass failed (%s: %s)", self.info.version,
                        type(e).__name__, str(e)[:200])
            return None
        if found is None:
            return None
        layer = dict(self._learn.model.named_modules())[found[0]]
        layer.register_forward_hook(self._keep_input)
        return found[0]

    def _keep_input(self, module, args, output) -> None:
        seen = getattr(self._local, "seen", None)
        if seen is not None:
            seen.append(args[0])

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
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
        return x.as_subclass(self._torch.Tensor).numpy()  # skip TensorImage's __torch_function__ dispatch

    def run(self, batch: np.ndarray, alone: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self._torch
        self._local.seen = seen = []
        try:
            with self._run_lock, torch.inference_mode():
                out = self._learn.model(torch.from_numpy(batch))
                probs = self._activation(out) if self._activation is not None else torch.softmax(out, dim=1)
        finally:
            self._local.seen = None
        feats = seen[-1].float().numpy().copy() if seen else None
        return probs.float().cpu().numpy(), feats

    def predict(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        if not images:
            return np.zeros((0, len(self.info.vocab)), dtype=np.float32), None
        return self.run(self.prepare(images))

    def predict_probs(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.predict(images)[0]
