"""A small world for rollout tests: a registry with a current version and a candidate, stand-in models whose
mistakes the test chooses, reviewed items made through the real log and desk, and shadow traffic through the real
pipeline and shadow scorer.

Images are solid colours: the dominant channel is the true class, the other two channels encode the image's
index, so a ``ColourModel`` can be wrong on exactly the indices a test names.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from model import rollout, versions
from model.predictor import ModelInfo
from serving.imageio import encode_for_storage
from tests.review_fixtures import Kit, probs, upload

VOCAB = ("red", "green", "blue")
SHA_CUR, SHA_CAND = "c" * 64, "d" * 64
LOW = probs(0.4, 0.3, 0.3)  # low confidence: such a prediction is queued even outside the audit sample


def colour_image(cls: int, idx: int) -> Image.Image:
    rgb = [0, 0, 0]
    rgb[cls] = 220
    rgb[(cls + 1) % 3], rgb[(cls + 2) % 3] = idx % 100, idx // 100
    return Image.new("RGB", (16, 16), tuple(rgb))


def png_bytes(img: Image.Image) -> bytes:
    return encode_for_storage(img)


def sha_of(img: Image.Image) -> str:
    """The stored image's name for an upload of ``img`` as a PNG (small images are stored losslessly)."""
    return hashlib.sha256(encode_for_storage(img, lossless_source=True)).hexdigest()


@dataclass(eq=False)
class ColourModel:
    """Predicts the dominant colour, except on the image indices in ``wrong`` (then the next class)."""

    info: ModelInfo
    wrong: set = field(default_factory=set)
    calls: int = 0

    def predict_probs(self, images) -> np.ndarray:
        self.calls += 1
        out = []
        for im in images:
            rgb = im.convert("RGB").getpixel((0, 0))
            cls = int(np.argmax(rgb))
            idx = rgb[(cls + 1) % 3] + 100 * rgb[(cls + 2) % 3]
            if idx in self.wrong:
                cls = (cls + 1) % 3
            p = np.full(3, 0.1, dtype=np.float32)
            p[cls] = 0.8
            out.append(p)
        return np.stack(out) if out else np.zeros((0, 3), np.float32)


@dataclass
class World:
    kit: Kit
    current: versions.VersionRecord
    candidate: versions.VersionRecord
    cur: ColourModel
    cand: ColourModel
    truth: dict = field(default_factory=dict)  # image sha256 -> true label

    @property
    def store(self):
        return self.kit.store

    @property
    def settings(self):
        return self.kit.store.settings

    def load(self, record):
        return {self.current.sha256: self.cur, self.candidate.sha256: self.cand}[record.sha256]

    def review(self, indices, *, audit: bool, reviewer: str = "alice") -> None:
        """Log one image per index as live traffic and have a reviewer label every queued item with its truth."""
        store = self.store
        store.thresholds = replace(store.thresholds, audit_rate=1.0 if audit else 0.0)
        for idx in indices:
            img = colour_image(idx % 3, idx)
            self.truth[sha_of(img)] = VOCAB[idx % 3]
            store.log_prediction(model=self.cur.info, **upload(img), probs=LOW, source="upload", latency_ms=1.0)
        store.flush()
        while (item := self.kit.desk.next_item(reviewer)) is not None:
            self.kit.desk.decide(reviewer, item.item_id, action="relabel", label=self.truth[item.image_sha256],
                                 idempotency_key=uuid.uuid4().hex)

    def shadow_traffic(self, indices) -> list:
        """Live requests answered by the current model with the candidate in shadow; returns the answers."""
        from serving.pipeline import Input, Pipeline
        from serving.router import ModelRouter
        from serving.shadow import ShadowScorer

        router = ModelRouter(self.cur)
        router.set_candidate(self.cand, "shadow")
        scorer = ShadowScorer(self.store, decode=decode, maxsize=len(indices) + 1)
        pipeline = Pipeline.from_settings(self.settings, router, self.store, shadow=scorer)
        try:
            answers = pipeline.predict([Input(png_bytes(colour_image(i % 3, i)), "upload") for i in indices])
            scorer.flush()
        finally:
            scorer.close()
        self.store.flush()
        return answers

    def gate(self):
        return rollout.check_gate(self.store, self.settings, self.candidate.version, self.load)


def make_world(kit: Kit, *, heldout=(), trained=()) -> World:
    """Register the current version and a candidate (its held-out split: ``heldout`` indices, stored as images;
    ``trained``: indices it was trained on)."""
    store = kit.store
    cur = ColourModel(ModelInfo("colours", SHA_CUR, VOCAB, "onnx"))
    cand = ColourModel(ModelInfo("colours", SHA_CAND, VOCAB, "onnx"))
    images = []
    for split, indices in (("valid", heldout), ("train", trained)):
        for idx in indices:
            img = colour_image(idx % 3, idx)
            sha = store.images.put_image(img, lossless_source=True).sha256
            images.append((sha, VOCAB[idx % 3], split, "dataset"))

    def setup(s):
        now = store.clock()
        a = versions.register(s, name="colours", sha256=SHA_CUR, path="models/cur/export.pkl", vocab=VOCAB, now=now,
                              metrics={"error_rate": 0.10})
        versions.set_status(s, a.version, "current", now=now)
        b = versions.register(s, name="colours", sha256=SHA_CAND, path="models/cand/export.pkl", vocab=VOCAB,
                              now=now, parent=a.version, metrics={"error_rate": 0.08}, training_images=images)
        return versions.get(s, a.version), b

    current, candidate = store.transaction(setup)
    for model in (cur, cand):
        store.register_model(model.info)
    return World(kit, current, candidate, cur, cand)


def decode(data: bytes):
    """The served path's decoder with the default limits (what ShadowScorer re-decodes jobs with)."""
    from serving.imageio import decode_image

    return decode_image(data, max_bytes=10 << 20, max_pixels=40_000_000)
