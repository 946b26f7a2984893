"""The one prediction path: untrusted bytes -> decoded image -> the routed model -> logged -> top-k answer.

Every front end calls ``Pipeline.predict``: the Gradio upload, webcam, live stream and Sketchpad events, the REST
API, and the dataset audit. Routing (current / canary), shadow scoring and monitoring hook in here, once.
A batch is decoded item by item (a bad item is refused with its own message; the others still get answers) and
each answering model runs ONCE on all of its good items.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from model.predictor import ModelInfo, ThreadPlan, top_k
from model.unfamiliar import Detector
from serving.batcher import Batcher
from serving.imageio import ImageRejected, decode_image, image_stats
from serving.router import ModelRouter
from serving.shadow import ShadowJob

# Requests a shadow model scores: live traffic only (not dataset audits or re-scoring jobs).
LIVE_SOURCES = frozenset({"upload", "webcam", "sketch", "stream", "api"})

# Sources whose blank (near-white) image means "nothing there yet", not a picture of white paper.
BLANK_IS_EMPTY = frozenset({"sketch"})
EMPTY_CANVAS = "The canvas is empty: draw something first."


@dataclass(frozen=True)
class Input:
    data: bytes | None  # the encoded image as received; None: no image (an empty component)
    source: str  # review.types.SOURCES
    session: str | None = None  # sticks a browser session to one model during a canary rollout
    claimed_label: str | None = None  # a label the caller already knows (dataset audit)
    log: bool = True  # False: answer only (e.g. live-stream frames between the logged ones)


@dataclass(frozen=True)
class Answer:
    probs: np.ndarray  # in model.vocab order
    model: ModelInfo  # the version that actually answered
    latency_ms: float
    prediction_id: str | None  # None when not logged
    top_k: dict[str, float]  # most probable first (the shape gr.Label takes)
    features: np.ndarray | None = None  # (D,) the classifier's input (model/graph.py), None if the model has none
    # Unlike the images the model was checked on (model/unfamiliar.py)? None: unknown (no detector, no features).
    unfamiliar: bool | None = None
    unfamiliar_score: float | None = None

    @property
    def label(self) -> str:
        return self.model.vocab[int(np.argmax(self.probs))]

    @property
    def confidence(self) -> float:
        return float(np.max(self.probs))


Result = Answer | ImageRejected | None


class PredictionLog(Protocol):
    def log_prediction(self, *, model: ModelInfo, data: bytes, stats: dict, probs: np.ndarray, source: str,
                       latency_ms: float, claimed_label: str | None = None, unfamiliar: bool | None = None,
                       unfamiliar_score: float | None = None) -> str: ...


def stats(img: Image.Image) -> dict:
    """What the request knows of the decoded image for the log, at no cost (the writer measures the rest)."""
    return image_stats(img, brightness=False)


class Observer(Protocol):
    """Sees every batch once (serving.metrics.Metrics): its results, or that it failed."""

    def observed(self, items: Sequence[Input], results: Sequence[Result]) -> None: ...

    def failed(self, items: Sequence[Input]) -> None: ...


class Pipeline:
    def __init__(self, router: ModelRouter, log: PredictionLog, *, max_bytes: int, max_pixels: int, top_k: int,
                 shadow=None, observer: Observer | None = None, batcher: Batcher | None = None,
                 decoders: int = 1, detectors: Callable[[ModelInfo], Detector | None] | None = None):
        self.router = router
        self.batcher = batcher or Batcher()
        self.log = log
        self.shadow = shadow  # serving.shadow.ShadowScorer, or None: no shadow scoring
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.top_k = top_k
        self.observer = observer
        self._decoding = threading.BoundedSemaphore(decoders)
        # The answering version's unfamiliar-input detector (serving/unfamiliar.Detectors), None: never flag
        self.detectors = detectors

    @classmethod
    def from_settings(cls, settings, router: ModelRouter, log: PredictionLog, shadow=None,
                      observer: Observer | None = None, detectors=None) -> Pipeline:
        # Requests from every front end share one batcher (serving/batcher.py), lanes as the ThreadPlan says.
        lanes = ThreadPlan.from_settings(settings).lanes
        return cls(router, log, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                   top_k=settings.top_k, shadow=shadow, observer=observer,
                   batcher=Batcher(lanes, settings.max_batch_size), decoders=lanes, detectors=detectors)

    def decode_bytes(self, data: bytes) -> Image.Image:
        return decode_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels)

    def decode(self, item: Input) -> Image.Image | ImageRejected | None:
        if item.data is None:
            return ImageRejected(EMPTY_CANVAS) if item.source in BLANK_IS_EMPTY else None
        try:
            img = self.decode_bytes(item.data)
        except ImageRejected as e:
            return e
        if item.source in BLANK_IS_EMPTY and img.convert("L").getextrema()[0] > 250:
            # A blank canvas is a valid image, but classifying white paper only adds noise to the log.
            return ImageRejected(EMPTY_CANVAS)
        return img

    def predict(self, items: Sequence[Input]) -> list[Result]:
        """One result per item, in order: an Answer, the ImageRejected that says what is wrong, or None (no image)."""
        if self.observer is None:
            return self._predict(items)
        try:
            out = self._predict(items)
        except Exception:
            self.observer.failed(items)
            raise
        self.observer.observed(items, out)
        return out

    def _predict(self, items: Sequence[Input]) -> list[Result]:
        start = time.perf_counter()
        routes = self.router.routes()  # one snapshot for the whole batch: a swap never splits it
        # Per item: the decoded image's sizes for the log (or why there is no answer), and who answers it.
        results: list = [None] * len(items)
        groups: dict[int, tuple] = {}  # id(predictor) -> (predictor, [item index], [its model input])
        with self.batcher.entered():
            for i, item in enumerate(items):
                # Decoded pixels live only here: a 40-megapixel upload is ~120 MB of them. Each becomes its model
                # input (e.g. 224 x 224) before the next is decoded, and at most ``lanes`` requests decode at once,
                # so what waits for the model (up to LOUPE_MAX_BATCH_SIZE requests per lane) holds only inputs.
                with self._decoding:
                    img = self.decode(item)
                    if not isinstance(img, Image.Image):
                        results[i] = img  # rejected or empty: nothing logged, nothing stored
                        continue
                    model = routes.answering(item.session)
                    _, idx, inputs = groups.setdefault(id(model), (model, [], []))
                    idx.append(i)
                    inputs.append(model.prepare([img]) if hasattr(model, "prepare") else img)
                    results[i] = stats(img)
                    del img
            answered: dict[int, tuple] = {}  # item index -> (predictor, probability row, feature row, flag, score)
            for model, idx, inputs in groups.values():
                if hasattr(model, "prepare"):
                    rows = [(p[0], None if f is None else f[0]) for p, f in self.batcher.run(model, inputs)]
                else:  # a stand-in predictor (tests): answers directly, no features
                    rows = [(p, None) for p in np.asarray(model.predict_probs(inputs))]
                feats = None if any(f is None for _, f in rows) else np.stack([f for _, f in rows])
                flags = self._unfamiliar(model.info, feats)
                for k, (i, (row, feat)) in enumerate(zip(idx, rows, strict=True)):
                    flag, score = (None, None) if flags is None else (bool(flags[0][k]), float(flags[1][k]))
                    answered[i] = (model, row, feat, flag, score)
        latency_ms = (time.perf_counter() - start) * 1000
        # The log gets the bytes as received and the sizes; its writer decodes, measures and stores the rest.
        out: list[Result] = []
        for i, (item, result) in enumerate(zip(items, results, strict=True)):
            if i not in answered:
                out.append(result)
                continue
            model, row, feat, flag, score = answered[i]
            pid = None
            if item.log:
                pid = self.log.log_prediction(model=model.info, data=item.data, stats=result, probs=row,
                                              source=item.source, latency_ms=latency_ms,
                                              claimed_label=item.claimed_label, unfamiliar=flag,
                                              unfamiliar_score=score)
            out.append(Answer(row, model.info, latency_ms, pid, top_k(row, model.info.vocab, self.top_k), feat,
                              flag, score))
        self._shadow(routes, items, out)
        return out

    def _unfamiliar(self, info: ModelInfo, feats: np.ndarray | None):
        """(flags, scores) for one model's batch, or None: unknown (no detector for this version, no features)."""
        if self.detectors is None or feats is None:
            return None
        detector = self.detectors(info)
        return None if detector is None else detector.flags(feats)

    def _shadow(self, routes, items: Sequence[Input], out: list[Result]) -> None:
        """Hand the logged live answers to the shadow model, if one is set; returns at once (serving.shadow)."""
        candidate = routes.shadow()
        if candidate is None or self.shadow is None:
            return
        jobs = [ShadowJob(answer.prediction_id, item.data, answer.model.version, answer.label)
                for item, answer in zip(items, out, strict=True)
                if isinstance(answer, Answer) and answer.prediction_id and item.source in LIVE_SOURCES]
        if jobs:
            self.shadow.submit(candidate, jobs)

    def predict_one(self, item: Input) -> Result:
        return self.predict([item])[0]
