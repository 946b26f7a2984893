"""Prometheus metrics (prometheus-client): ``GET /metrics`` renders ``Metrics.registry``.

Request metrics are counted where requests happen, once: ``Pipeline.predict`` (``observed`` / ``failed``), the REST
gate's and Gradio's queue's "busy" refusals (``busy``). Gauges that need the database (queue sizes, drift scores,
the drift window's unfamiliar rate) are set by the background monitor (review/monitor.py) every few seconds, so a
scrape never queries the database. Model versions and the prediction log's counters are read at scrape time from
memory (the router's snapshot, the writer's counters).

What it exposes is aggregate only: counts, histograms, scores, model versions (public: GET /api/v1/model). No
item labels, image ids or reviewer names. No class names either, though they are public too (GET /api/v1/model,
every answer): a label per class multiplies series by the vocabulary (1,000 for an ImageNet-like model), and
per-class views belong to the Monitor tab.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serving.imageio import ImageRejected

OUTCOMES = ("ok", "rejected", "busy", "error")
GRADIO = "gradio"  # source of refusals by Gradio's queue: shared by every tab, so no one source
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        # A registry per app, not the process-wide default: tests build several apps in one process.
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("loupe_requests", "Prediction requests by source and outcome (ok: answered, "
                                "rejected: the image was refused, busy: refused under load, error: failed)",
                                ["source", "outcome"], registry=r)
        self.latency = Histogram("loupe_predict_latency_seconds", "Decode + model time of answered predictions",
                                 ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self.confidence = Histogram("loupe_prediction_confidence", "Top-class probability of answered predictions",
                                    ["model"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.unfamiliar = Counter("loupe_unfamiliar_answers", "Answers flagged as unlike the model's training data",
                                  ["model"], registry=r)
        self.unfamiliar_rate = Gauge("loupe_unfamiliar_rate", "Share of the drift window flagged unfamiliar",
                                     ["model"], registry=r)
        self.queue_open = Gauge("loupe_review_queue_open", "Open review items by reason (an item may have several)",
                                ["reason"], registry=r)
        self.drift_psi = Gauge("loupe_drift_psi", "Population stability index of the drift window against the "
                               "model's reference, per check", ["model", "check"], registry=r)
        self.drift_alarm = Gauge("loupe_drift_alarm", "1 while a drift check alarms", ["model", "check"], registry=r)
        self.drift_window = Gauge("loupe_drift_window_predictions", "Predictions in the drift window", ["model"],
                                  registry=r)
        self.monitor_age = Gauge("loupe_monitor_last_check_timestamp_seconds",
                                 "When the background monitor last finished a check", registry=r)
        for source in ("upload", "webcam", "sketch", "stream", "api"):
            for outcome in OUTCOMES:
                self.requests.labels(source, outcome)  # present at 0 from the start: rate() needs a first sample
        self.requests.labels(GRADIO, "busy")

    def observed(self, items: Sequence, results: Sequence) -> None:
        """After ``Pipeline.predict``: one outcome per item (None results, "no image", are not requests)."""
        for item, result in zip(items, results, strict=True):
            if result is None:
                continue
            if isinstance(result, ImageRejected):
                self.requests.labels(item.source, "rejected").inc()
                continue
            self.requests.labels(item.source, "ok").inc()
            self.latency.labels(item.source).observe(result.latency_ms / 1000.0)
            version = result.model.version
            self.confidence.labels(version).observe(result.confidence)
            if getattr(result, "unfamiliar", None):  # the unfamiliar-input flag, once answers carry one
                self.unfamiliar.labels(version).inc()

    def failed(self, items: Sequence) -> None:
        for item in items:
            self.requests.labels(item.source, "error").inc()

    def busy(self, source: str, n: int = 1) -> None:
        self.requests.labels(source, "busy").inc(n)

    def watch(self, router, store) -> None:
        """Expose the serving versions and the prediction log's counters, read from memory at each scrape."""
        self.registry.register(_Live(router, store))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Live:
    """A collector reading the router's snapshot and the log writer's counters (no database, no locks held)."""

    def __init__(self, router, store):
        self.router = router
        self.store = store

    def describe(self):
        return []  # not described at registration: collect() needs a live router

    def collect(self):
        info = InfoMetricFamily("loupe_model", "Model versions serving, by role (current, shadow, canary)",
                                labels=["role"])
        routes = self.router.routes()
        models = {"current": routes.current}
        if routes.candidate is not None and routes.role is not None:
            models[routes.role] = routes.candidate
        for role, predictor in models.items():
            info.add_metric([role], {"version": predictor.info.version, "backend": predictor.info.backend})
        yield info
        status = self.store.log_status()
        for name, key, text in (("loupe_log_dropped", "log_dropped", "Predictions dropped: the log queue stayed full"),
                                ("loupe_log_failed", "log_failed", "Predictions the log writer could not write"),
                                ("loupe_log_replayed", "log_replayed", "Predictions replayed from a dead spool")):
            c = CounterMetricFamily(name, text)
            c.add_metric([], status[key])
            yield c
        g = GaugeMetricFamily("loupe_log_pending", "Predictions waiting for the log writer")
        g.add_metric([], status["log_pending"])
        yield g
        g = GaugeMetricFamily("loupe_log_pending_bytes", "Upload bytes held by the log queue")
        g.add_metric([], status["log_pending_bytes"])
        yield g


class GradioBusyCounter:
    """ASGI middleware: counts the public Gradio queue's "queue is full" refusals (503 from /gradio_api/queue/join;
    Gradio refuses there, before any handler of ours runs)."""

    def __init__(self, app, metrics: Metrics, path: str = "/gradio_api/queue/join"):
        self.app = app
        self.metrics = metrics
        self.path = path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)

        async def watch(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                self.metrics.busy(GRADIO)
            await send(message)

        return await self.app(scope, receive, watch)
