"""Plain REST API beside Gradio: ``POST /api/v1/predict``, ``POST /api/v1/feedback``, ``GET /api/v1/model``,
``GET /healthz``, ``GET /metrics`` (Prometheus).

A FastAPI route costs ~5 ms of HTTP overhead against ~28 ms for Gradio's protocol (baselines.md), so
programmatic clients get this. It bypasses Gradio's queue, hence the ``Gate``: a few requests run, a
few wait, the rest get 503 + Retry-After at once.

A request takes a run/wait slot only once its whole body is in. Bodies are read under a separate, larger
``Allowance`` (503 when full), and ui/body_timeout.py ends any read the client stalls; so clients that send
headers and then nothing hold a reading slot for at most ``body_timeout_s`` and never a model slot.
"""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from model.unfamiliar import MESSAGE as UNFAMILIAR_MESSAGE
from review.types import ReviewError, UnknownPrediction
from serving.gate import Allowance, Busy, Gate
from serving.imageio import ImageRejected
from serving.pipeline import Input, Pipeline

MB = 1 << 20
# Multipart framing (boundaries, part headers) on top of the file itself.
FORM_OVERHEAD = 64 * 1024
RETRY_AFTER_S = 2
SESSION_HEADER = "x-loupe-session"


def _mb(n: int) -> str:
    return f"{n / MB:.1f}".removesuffix(".0") + " MB"


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ApiHandlers:
    def __init__(self, settings, pipeline: Pipeline, gate: Gate):
        self.settings = settings
        self.pipeline = pipeline
        self.gate = gate
        self.reading = Allowance(settings.rest_max_reading)
        self.max_bytes = settings.max_upload_bytes

    @staticmethod
    def model_json(info) -> dict:
        return {"name": info.name, "version": info.version, "sha256": info.sha256, "backend": info.backend}

    def too_large(self, size: int | None = None) -> JSONResponse:
        got = f" ({_mb(size)})" if size else ""
        return error(413, f"This file is too large{got}; the limit is {_mb(self.max_bytes)}.")

    def predict_upload(self, upload: UploadFile, start: float, session: str | None = None) -> JSONResponse:
        """Runs in a worker thread, already admitted. Reading the spooled file, decoding and predicting all
        happen in a run slot, so waiting requests hold at most their (mostly on-disk) spool, not pixels."""
        with self.gate.running():
            upload.file.seek(0)
            answer = self.pipeline.predict_one(Input(upload.file.read(self.max_bytes + 1), "api", session))
        if isinstance(answer, ImageRejected):
            return error(422, answer.args[0])
        latency_ms = (time.perf_counter() - start) * 1000
        vocab = answer.model.vocab
        return JSONResponse({
            "label": answer.label,
            "confidence": answer.confidence,
            "probabilities": {c: float(p) for c, p in zip(vocab, answer.probs, strict=True)},  # vocab order
            "top_k": [{"label": c, "probability": p} for c, p in answer.top_k.items()],
            "model": self.model_json(answer.model),
            "latency_ms": round(latency_ms, 3),
            "prediction_id": answer.prediction_id,
            # unlike the images the model was trained on (model/unfamiliar.py); null: unknown (no reference data)
            "unfamiliar": answer.unfamiliar,
            "unfamiliar_score": None if answer.unfamiliar_score is None else round(answer.unfamiliar_score, 3),
            "warning": UNFAMILIAR_MESSAGE if answer.unfamiliar else None,
        })

    async def read_form(self, request: Request) -> FormData:
        """The whole body, parsed (files over 1 MB spool to disk), under a reading slot. A stalled client is
        cut off by the body timeout middleware, which releases the slot as the BodyTimeout unwinds."""
        with self.reading.held():
            return await request.form(max_files=1, max_fields=8)

    async def read_and_predict(self, request: Request, start: float, session: str | None = None) -> JSONResponse:
        try:
            form = await self.read_form(request)
        except HTTPException as e:  # Starlette's malformed-multipart error, in our JSON shape
            return error(e.status_code, f"Malformed upload: {e.detail}")
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return error(422, "Send the image as multipart/form-data in a field named 'file'.")
            if upload.size is not None and upload.size > self.max_bytes:
                return self.too_large()
            # Every byte is in: only now does the request compete for the model. Admission stays on the
            # event loop, before a worker thread is taken: under overload the refusal costs next to nothing.
            with self.gate.admitted():
                return await run_in_threadpool(self.predict_upload, upload, start, session)
        finally:
            await form.close()


class Feedback(BaseModel):
    """What a user says about an answer: right or wrong, and/or the right class."""

    prediction_id: str = Field(description="The prediction_id of a POST /api/v1/predict answer.", max_length=64)
    correct: bool | None = Field(default=None, description="Was the answer right?")
    label: str | None = Field(default=None, description="The right class (one of the model's classes).",
                              max_length=200)
    none_of_these: bool = Field(default=False, description="The image shows none of the model's classes "
                                "(out of domain): queued for review as such.")


def build_api_router(settings, pipeline: Pipeline, store, gate: Gate, monitor=None) -> APIRouter:
    api = ApiHandlers(settings, pipeline, gate)
    models = pipeline.router
    router = APIRouter()
    metrics = monitor.metrics if monitor is not None else None

    @router.get("/healthz")
    async def healthz() -> dict:
        # Cheap on purpose (Docker HEALTHCHECK polls it): no model call, no database. "degraded" stays HTTP 200:
        # predictions are still answered, only not (fully) logged, and a restart would not fix a full or
        # read-only disk; monitoring reads the status field and its problems. Drift is its own field (the latest
        # background check, review/monitor.py): inputs changing is no reason to restart anything.
        out = {**store.health(), "model": models.current.info.version}
        if monitor is not None:
            out["drift"] = monitor.health()
        return out

    if metrics is not None:
        token = settings.metrics_token.get_secret_value().encode() if settings.metrics_token else None

        @router.get("/metrics", include_in_schema=False)
        def prometheus_metrics(request: Request) -> Response:
            """Prometheus text format (serving/metrics.py). Rendered in a worker thread: it reads only memory."""
            if token is not None:
                given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
                if not hmac.compare_digest(given, token):
                    return error(401, "Send Authorization: Bearer <LOUPE_METRICS_TOKEN>.",
                                 headers={"WWW-Authenticate": "Bearer"})
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

    @router.get("/api/v1/model")
    async def model() -> dict:
        info = models.current.info
        return {**api.model_json(info), "classes": list(info.vocab), "top_k": settings.top_k,
                "routes": models.routes().versions()}

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
        # Optional: a client that sends the same X-Loupe-Session on every call gets the same model version
        # throughout a canary rollout (without it, REST calls stay on the current model).
        session = request.headers.get(SESSION_HEADER, "")[:200] or None
        try:
            return await api.read_and_predict(request, start, session)
        except Busy as e:
            if metrics is not None:
                metrics.busy("api")
            return error(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)})

    @router.post("/api/v1/feedback", responses={404: {"description": "Unknown prediction_id"},
                                                422: {"description": "Not one of the model's classes"}})
    def feedback(body: Feedback):
        """Tell Loupe whether an answer was right, or what the right class is: the prediction is queued for
        review when a person contradicts a confident model (and the label feeds retraining once reviewed)."""
        try:
            store.record_feedback(body.prediction_id, correct=False if body.none_of_these else body.correct,
                                  claimed_label=body.label, out_of_domain=body.none_of_these)
        except UnknownPrediction as e:
            return error(404, e.args[0])
        except ReviewError as e:
            return error(422, e.args[0])
        return {"status": "recorded"}

    return router
