"""What the Predict UI does, as plain Python (tests call it without a server): reading an event's image payload
(only uploads this client made: ui/upload_store.py), one prediction path for every tab (serving/pipeline.py),
the answer's info line, feedback, and the header. ui/predict_tab.py lays the components out and wires them.
"""

from __future__ import annotations

import base64
import binascii

import gradio as gr

from model.unfamiliar import MESSAGE as UNFAMILIAR_MESSAGE
from review.types import ReviewError
from serving.imageio import ImageRejected
from serving.pipeline import Answer, Input, Pipeline, Result
from ui.examples import describe

# The feedback dropdown's "none of these" choice (its value; the label says "Not a <domain>"). Parentheses: no
# class name is matched by it (a class literally named so still wins: see feedback()).
NONE_OF_THESE = "(none of these)"
NOT_AN_UPLOAD = "This image is not one you uploaded, or it has expired; please upload it again."


def serving_demo(settings) -> bool:
    return settings.model_path is None


def none_of_these_label(settings) -> str:
    """The feedback control's out-of-domain choice: "Not a <domain>" (LOUPE_MODEL_DOMAIN, the demo's "digit")."""
    domain = settings.model_domain or ("digit" if serving_demo(settings) else None)
    return f"Not a {domain} (none of these)" if domain else "None of these"


def unfamiliar_warning(answer: Answer) -> str | None:
    return UNFAMILIAR_MESSAGE if answer.unfamiliar else None


def _sessions(requests, n: int) -> list[str | None]:
    """Session ids of a batch (Gradio passes one gr.Request per item to a batched function), or Nones."""
    if isinstance(requests, list | tuple):
        return [getattr(r, "session_hash", None) for r in requests] + [None] * (n - len(requests))
    return [getattr(requests, "session_hash", None)] * n


class PredictHandlers:
    """Event handlers behind the Predict UI. No Gradio server needed to call them."""

    def __init__(self, settings, pipeline: Pipeline, store, uploads=None):
        self.settings = settings
        self.pipeline = pipeline
        self.store = store
        self.max_bytes = settings.max_upload_bytes
        # The files clients uploaded (ui.upload_store.UploadStore): a path is opened only if ``uploads.claim``
        # vouches for it. None: no path is opened at all (data: URLs still work).
        self.uploads = uploads

    # ---- input ---------------------------------------------------------------------------
    def read(self, payload) -> bytes | None:
        """Raw bytes of an Image payload (a file in Gradio's upload cache, or a data: URL as live frames are),
        a Sketchpad payload (its composite), or a plain path; None when there is no image.

        At most max_bytes + 1 bytes are read, so decode_image can still tell "over the limit" from "at it".
        """
        if isinstance(payload, dict) and "composite" in payload:  # Sketchpad / ImageEditor value
            payload = payload["composite"]
        if isinstance(payload, dict):
            url = str(payload.get("url") or "")
            if not payload.get("path") and url.startswith("data:"):
                return self._data_url_bytes(url)
            payload = payload.get("path")
        if not payload:
            return None
        # The HTTP guard already refused paths this client did not upload; this is the second layer, for any
        # route or payload shape it might miss (a plain string, a dict without meta).
        if self.uploads is None or not self.uploads.claim(str(payload)):
            raise ImageRejected(NOT_AN_UPLOAD)
        with open(str(payload), "rb") as f:
            return f.read(self.max_bytes + 1)

    def _data_url_bytes(self, url: str) -> bytes:
        header, _, b64 = url.partition(",")
        if not header.endswith(";base64"):
            raise ImageRejected("The browser sent an image in a form we cannot read; please try again.")
        # Decode only what can matter: just enough characters for max_bytes + 1 bytes.
        try:
            return base64.b64decode(b64[: -(-(self.max_bytes + 1) // 3) * 4])[: self.max_bytes + 1]
        except binascii.Error:
            raise ImageRejected("The browser sent a damaged image; please try again.") from None

    def to_input(self, payload, source: str, session: str | None = None, *, log: bool = True) -> Input | ImageRejected:
        try:
            return Input(self.read(payload), source, session, log=log)
        except ImageRejected as e:
            return e
        except FileNotFoundError:  # Gradio's cache was cleaned under an old tab (delete_cache)
            return ImageRejected("This upload is no longer available; please upload the image again.")

    # ---- prediction ----------------------------------------------------------------------
    def classify(self, payloads: list, source: str, sessions: list[str | None] | None = None) -> list[Result]:
        """Read each payload, then the one prediction path for all of them (a rejected read keeps its message)."""
        sessions = sessions or [None] * len(payloads)
        inputs = [self.to_input(p, source, s) for p, s in zip(payloads, sessions, strict=True)]
        good = [i for i in inputs if isinstance(i, Input)]
        answers = iter(self.pipeline.predict(good))
        return [next(answers) if isinstance(i, Input) else i for i in inputs]

    @staticmethod
    def describe(answer: Answer) -> str:
        line = f"Model `{answer.model.version}` · {answer.model.backend} · {answer.latency_ms:.1f} ms"
        if answer.unfamiliar:  # beside the answer, in every tab: the answer is probably meaningless
            return f"⚠️ **{UNFAMILIAR_MESSAGE}**\n\n{line}"
        return line

    def predict_batch(self, payloads: list, source: str, requests=None) -> tuple[list, list, list, list]:
        """Gradio batch function: lists in, one list per output component out (label, info line, state, and the
        answer's details for API clients: prediction_id, model version, confidence, latency).

        A batch of one that is rejected raises ``gr.Error`` (the usual case: a person's own bad file).
        In a batch of several, raising would fail everyone's request, so a rejected item gets its message
        in its own info line while the others get their answers.
        """
        payloads = list(payloads)
        results = self.classify(payloads, source, _sessions(requests, len(payloads)))
        if len(results) == 1 and isinstance(results[0], ImageRejected):
            raise gr.Error(results[0].args[0], print_exception=False)
        labels, infos, states, details = [], [], [], []
        for r in results:
            if isinstance(r, Answer):
                labels.append(r.top_k)
                infos.append(self.describe(r))
                states.append({"id": r.prediction_id, "label": r.label, "model": r.model.version,
                               "classes": list(r.model.vocab)})
                details.append({"prediction_id": r.prediction_id, "label": r.label, "confidence": r.confidence,
                                "model": r.model.version, "latency_ms": round(r.latency_ms, 3),
                                "unfamiliar": r.unfamiliar, "warning": unfamiliar_warning(r)})
            else:
                labels.append(None)
                infos.append(f"**Image not accepted:** {r.args[0]}" if isinstance(r, ImageRejected) else "")
                states.append(None)
                details.append(None)
        return labels, infos, states, details

    def stream_frame(self, payload, count: int | None, request=None) -> tuple:
        """One live-webcam frame -> (top-k, info, frame count). Logs one frame in ``stream_log_every``."""
        count = count or 0
        item = self.to_input(payload, "stream", _sessions(request, 1)[0],
                             log=count % self.settings.stream_log_every == 0)  # the first frame, then every Nth
        answer = self.pipeline.predict_one(item) if isinstance(item, Input) else item
        if answer is None:  # the stream has not produced a frame yet
            return gr.skip(), gr.skip(), count
        if isinstance(answer, ImageRejected):
            # Raising would end the whole stream over one bad frame; show it and keep going.
            return None, f"**Frame skipped:** {answer.args[0]}", count
        return answer.top_k, self.describe(answer), count + 1

    # ---- feedback ------------------------------------------------------------------------
    def feedback(self, state: dict | None, *, correct: bool | None, claimed: str | None = None) -> str:
        """Record "Is this right?" (``correct``) or "the right answer is ..." (``claimed``) for the last prediction."""
        if not state:
            return "Classify an image first, then tell us whether the answer was right."
        if claimed == NONE_OF_THESE and claimed not in state["classes"]:
            try:
                self.store.record_feedback(state["id"], correct=False, claimed_label=None, out_of_domain=True)
            except ReviewError as e:
                raise gr.Error(e.args[0], print_exception=False) from None
            return "Thanks, noted: the image shows none of these classes."
        if claimed is not None:
            if claimed not in state["classes"]:
                raise gr.Error("Pick one of the listed classes.", print_exception=False)
            correct = claimed == state["label"]
        try:
            self.store.record_feedback(state["id"], correct=correct, claimed_label=claimed)
        except ReviewError as e:  # e.g. the prediction was purged meanwhile; the message is safe to show
            raise gr.Error(e.args[0], print_exception=False) from None
        if correct:
            return "Thanks, noted: the answer was right."
        if claimed is None:
            return "Thanks, noted. If you know the right answer, pick it above."
        return f"Thanks, noted: the right answer is **{claimed}**."

    def api_feedback(self, prediction_id: str, correct: bool | None = None, label: str | None = None,
                     none_of_these: bool = False) -> str:
        """Feedback on a /predict answer for API clients (gradio_client): was it right, and/or the right class,
        or ``none_of_these`` (the image shows none of the model's classes)."""
        try:
            self.store.record_feedback(prediction_id, correct=False if none_of_these else correct,
                                       claimed_label=label or None, out_of_domain=none_of_these)
        except ReviewError as e:
            raise gr.Error(e.args[0], print_exception=False) from None
        return "recorded"

    def reset_feedback(self, state: dict | None):
        """A new answer: the feedback widgets start afresh, offering the classes of the model that answered, and
        "none of these"."""
        if not state:
            return gr.update(choices=[], value=None), ""
        choices = [(c, c) for c in state["classes"]] + [(none_of_these_label(self.settings), NONE_OF_THESE)]
        return gr.update(choices=choices, value=None), ""

    def header(self) -> str:
        """Title (LOUPE_MODEL_NAME), what the model does (LOUPE_MODEL_DESCRIPTION), and which version answers: of
        the model serving now (the page refreshes it on load, so a promoted model shows at once)."""
        info = self.pipeline.router.current.info
        return (f"# {info.name}\n{describe(self.settings, list(info.vocab))}\n\n"
                f"<small>Model `{info.version}` · {len(info.vocab)} classes · {info.backend} · served by Loupe</small>")
