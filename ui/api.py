"""Plain REST API beside Gradio: ``POST /api/v1/predict``, ``GET /api/v1/model``, ``GET /healthz``.

A FastAPI route costs ~5 ms of HTTP overhead against ~28 ms for Gradio's protocol (baselines.md), so
programmatic clients get this. It bypasses Gradio's queue, hence the ``Gate``: a few requests run, a
few wait, the rest get 503 + Retry-After at once.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from model.gate import Busy, Gate
from model.imageio import ImageRejected, decode_image, image_stats
from model.predictor import top_k

MB = 1 << 20
# Multipart framing (boundaries, part headers) on top of the file itself.
FORM_OVERHEAD = 64 * 1024
RETRY_AFTER_S = 2


def _mb(n: int) -> str:
    return f"{n / MB:.1f}".removesuffix(".0") + " MB"


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ApiHandlers:
    def __init__(self, settings, predictor, service, gate: Gate):
        self.settings = settings
        self.predictor = predictor
        self.service = service
        self.gate = gate
        self.max_bytes = settings.max_upload_bytes

    def model_json(self) -> dict:
        info = self.predictor.info
        return {"name": info.name, "version": info.version, "sha256": info.sha256, "backend": info.backend}

    def too_large(self, size: int | None = None) -> JSONResponse:
        got = f" ({_mb(size)})" if size else ""
        return error(413, f"This file is too large{got}; the limit is {_mb(self.max_bytes)}.")

    def predict_bytes(self, data: bytes, start: float) -> JSONResponse:
        """Runs in a worker thread, already admitted: decode and predict in a run slot (decoding is CPU work too)."""
        try:
            with self.gate.running():
                img = decode_image(data, max_bytes=self.max_bytes, max_pixels=self.settings.max_pixels)
                probs = self.predictor.predict_probs([img])[0]
                stats = image_stats(img, brightness=False)
        except ImageRejected as e:
            return error(422, e.args[0])
        del img  # logging may wait for room in the log's queue: not while holding the decoded pixels
        latency_ms = (time.perf_counter() - start) * 1000
        pid = self.service.log_prediction(data=data, stats=stats, probs=probs, source="api", latency_ms=latency_ms)
        vocab = self.predictor.info.vocab
        best = int(probs.argmax())
        return JSONResponse({
            "label": vocab[best],
            "confidence": float(probs[best]),
            "probabilities": {c: float(p) for c, p in zip(vocab, probs, strict=True)},  # vocab order
            "top_k": [{"label": c, "probability": p}
                      for c, p in top_k(probs, vocab, self.settings.top_k).items()],
            "model": self.model_json(),
            "latency_ms": round(latency_ms, 3),
            "prediction_id": pid,
        })


    async def read_and_predict(self, request: Request, start: float) -> JSONResponse:
        try:
            async with request.form(max_files=1, max_fields=8) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    return error(422, "Send the image as multipart/form-data in a field named 'file'.")
                data = await upload.read(self.max_bytes + 1)
        except HTTPException as e:  # Starlette's malformed-multipart error, in our JSON shape
            return error(e.status_code, f"Malformed upload: {e.detail}")
        if len(data) > self.max_bytes:
            return self.too_large()
        return await run_in_threadpool(self.predict_bytes, data, start)


def build_api_router(settings, predictor, service, gate: Gate) -> APIRouter:
    api = ApiHandlers(settings, predictor, service, gate)
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict:
        # Cheap on purpose (Docker HEALTHCHECK polls it): no model call, no database. "degraded" stays HTTP 200:
        # predictions are still answered, only not (fully) logged, and a restart would not fix a full or
        # read-only disk; monitoring reads the status field and its problems.
        return {**service.health(), "model": predictor.info.version}

    @router.get("/api/v1/model")
    async def model() -> dict:
        return {**api.model_json(), "classes": list(predictor.info.vocab), "top_k": settings.top_k}

    @router.post("/api/v1/predict")
    async def predict(request: Request):
        """Multipart form with the image in field ``file``. Errors are JSON ``{"error": message}``."""
        start = time.perf_counter()
        # Refuse oversize bodies from the header, before the multipart parser spools them to disk.
        length = request.headers.get("content-length")
        if length is None:
            return error(411, "Send a Content-Length header (a multipart/form-data upload).")
        if not length.isdigit():
            return error(400, "Invalid Content-Length header.")
        if int(length) > api.max_bytes + FORM_OVERHEAD:
            return api.too_large(int(length))
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(415, "Send the image as multipart/form-data in a field named 'file'.")
        try:
            # Admission on the event loop, before the body is read or a worker thread is taken: under
            # overload the refusal must cost next to nothing.
            with api.gate.admitted():
                return await api.read_and_predict(request, start)
        except Busy as e:
            return error(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)})

    return router
