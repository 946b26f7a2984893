"""The reviewer-only Review app (mounted at /review): one queued image at a time, decided with a key press.

Why the image is an <img> with a data: URL inside gr.HTML and not a gr.Image: Gradio copies a gr.Image value into
its shared cache folder, and *every* mounted Gradio app serves that folder, so the copy would be reachable through
the public app's file route at "/" without any login (and would outlive our retention purge). A data: URL only
travels inside the authenticated event stream and is never written to disk.

``ReviewHandlers`` is plain Python (tests call it without a server); ``build_review_app`` wires it to components.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from typing import Any, NamedTuple

import gradio as gr
from PIL import Image

from review.types import REASON_TEXT, REASONS, DecisionResult, QueueItem, ReviewError
from ui.review_auth import auth_fn, hf_auth_dependency, require_reviewer
from ui.review_keys import key_hint, keyboard_js, shortcut_keys

MAX_SIDE = 1280  # reviewers need detail, not the original 40-megapixel file over the wire
SMALL_SIDE = 256  # below this the browser enlarges the image pixelated, not blurred
PASS_THROUGH_BYTES = 400_000  # small stored PNGs/JPEGs are sent as they are: no decode/encode on the hot path
COUNTS_EVERY_S = 15.0


class Screen(NamedTuple):
    """Every output of every review event, in ``build_review_app``'s output order."""

    image: str  # HTML
    details: str  # Markdown: prediction, reasons, claimed labels, model
    probs: dict[str, float] | None  # gr.Label
    status: str  # Markdown: last action, conflicts, who is signed in
    token: str  # "<item_id>:<idempotency key>" of the item on screen, round-tripped by the browser
    state: dict
    choice: Any  # relabel selection, cleared for each item


def _md(text: object) -> str:
    """Escape Markdown/HTML in labels that came from users or dataset files."""
    out = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|~" else c for c in out)


def image_html(data: bytes, alt: str) -> str:
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
        if len(data) <= PASS_THROUGH_BYTES and max(size) <= MAX_SIDE and img.format in ("PNG", "JPEG"):
            mime, payload = f"image/{img.format.lower()}", data
        else:
            img.draft("RGB", (MAX_SIDE, MAX_SIDE))
            shown = img.convert("RGB")
            shown.thumbnail((MAX_SIDE, MAX_SIDE))
            buf = io.BytesIO()
            shown.save(buf, "JPEG", quality=88)
            mime, payload = "image/jpeg", buf.getvalue()
    src = f"data:{mime};base64,{base64.b64encode(payload).decode()}"
    css_class = ' class="small"' if max(size) < SMALL_SIDE else ""
    return f'<img id="review-img"{css_class} alt="{alt}" src="{src}">'


def item_details(item: QueueItem) -> str:
    reasons = "\n".join(f"- **{_md(r.replace('_', ' '))}**: {REASON_TEXT.get(r, '')}" for r in item.reasons)
    claimed = ", ".join(f"**{_md(c)}**" for c in item.claimed_labels) or "none"
    loss = f" · loss {item.loss:.2f}" if item.loss is not None else ""
    second = (f"\n\nSecond opinion: {item.decisions_so_far} of {item.required_decisions} decisions so far"
              if item.required_decisions > 1 else "")
    size = f" · {item.width}×{item.height} px" if item.width and item.height else ""
    return (f"### Model says: {_md(item.predicted)} ({item.confidence:.0%})\n\n"
            f"**Label given by a user or the dataset:** {claimed}\n\n**Why it is queued**\n{reasons}\n\n"
            f"<small>margin {item.margin:.2f} · entropy {item.entropy:.2f}{loss} · source {_md(item.source)}"
            f" · seen {item.seen}×{size} · {item.created:%Y-%m-%d %H:%M} UTC · model `{item.model_version}`"
            f"</small>{second}")


def counts_md(c: dict, reviewer: str) -> str:
    reasons = " · ".join(f"{name.replace('_', ' ')} {c['open_by_reason'].get(name, 0)}" for name in REASONS)
    dec = " · ".join(f"{a.replace('_', ' ')} {n}" for a, n in c["decisions"].items())
    lines = [f"**Open** {c['queue_open']} (claimed now {c['queue_claimed']}) · **done** {c['queue_done']}"
             f" · predictions logged {c['predictions']}", f"Open by reason: {reasons}",
             f"Decisions: {dec} · undone {c['undos']} · by you {c['by_reviewer'].get(reviewer, 0)}"]
    so = c["second_opinion"]
    if so["pairs"] or so["awaiting_second"]:
        agree = f"{so['agreement']:.0%}" if so["agreement"] is not None else "n/a"
        lines.append(f"Second opinions: agreement {agree} ({so['agreed']} of {so['pairs']}),"
                     f" {so['awaiting_second']} awaiting a second reviewer")
    audit = c["audit"]
    if audit["reviewed"]:
        lines.append(f"Audit sample accuracy: {audit['accuracy']:.0%} of {audit['reviewed']} reviewed")
    return "\n\n".join(lines)


def _conflict_md(result: DecisionResult) -> str:
    who = "; ".join(f"{_md(c.reviewer)}: {c.action.replace('_', ' ')}" + (f" → {_md(c.label)}" if c.label else "")
                    + f" at {c.time:%H:%M:%S}" for c in result.conflicts)
    return f"⚠️ **Conflict** — {_md(result.message)}" + (f" ({who})" if who else "")


def _filters(reason: str | None, predicted: str | None, model_version: str | None) -> dict:
    return {"reason": reason or None, "predicted": predicted or None, "model_version": model_version or None}


class ReviewHandlers:
    def __init__(self, settings, service, vocab, *, counts_ttl_s: float = 2.0):
        self.settings = settings
        self.service = service
        self.vocab = tuple(vocab)
        # Counting is the slow part (aggregates over the whole log, growing with it), so it runs after the next
        # item is on screen, and several reviewers share one recent result instead of each recounting.
        self.counts_ttl_s = counts_ttl_s
        self._counts: tuple[float, dict] | None = None
        self._counts_lock = threading.Lock()

    def _user(self, request, profile) -> str:
        return require_reviewer(request, self.settings, profile)

    def _screen(self, reviewer: str, filters: dict, status: str, *, state: dict | None, fresh: bool) -> Screen:
        """Claim (or keep) the reviewer's item and draw it. ``fresh``: a new idempotency key even for the same item
        (after a decision or undo: the old key would replay the old decision instead of recording a new one)."""
        try:
            item = self.service.next_item(reviewer, **filters)
        except ReviewError as e:
            raise gr.Error(str(e.args[0])) from e
        if item is None:
            empty = '<div id="review-empty">Nothing left to review with these filters.</div>'
            return Screen(empty, "", None, status, "", {"item_id": None, "key": None}, None)
        same = state is not None and state.get("item_id") == item.item_id and not fresh
        key = state["key"] if same else uuid.uuid4().hex
        try:
            html = image_html(self.service.image_bytes(item.image_sha256), f"Queued image {item.image_sha256[:12]}")
        except ReviewError as e:  # purged or lost file: still decidable (bad image, skip), so say so and go on
            html = f'<div id="review-missing">{_md(e.args[0])}</div>'
        probs = dict(list(item.probs.items())[: self.settings.top_k])
        return Screen(html, item_details(item), probs, status, f"{item.item_id}:{key}",
                      {"item_id": item.item_id, "key": key}, None)

    def progress(self, request: gr.Request, profile: gr.OAuthProfile | None = None) -> str:
        """Counts and progress (chained after each event, and on a timer)."""
        reviewer = self._user(request, profile)
        with self._counts_lock:  # one recount at a time; the others wait for it and reuse it
            now = time.monotonic()
            if self._counts is None or now - self._counts[0] >= self.counts_ttl_s:
                self._counts = (now, self.service.counts())
            counts = self._counts[1]
        return counts_md(counts, reviewer)

    def show(self, state, reason, predicted, model_version, request: gr.Request,
             profile: gr.OAuthProfile | None = None) -> Screen:
        """Page load, filter change, refresh."""
        reviewer = self._user(request, profile)
        return self._screen(reviewer, _filters(reason, predicted, model_version),
                            f"Signed in as **{_md(reviewer)}**", state=state, fresh=False)

    def decide(self, action: str, label: str | None, token: str, state, reason, predicted, model_version,
               request: gr.Request, profile: gr.OAuthProfile | None = None) -> Screen:
        reviewer = self._user(request, profile)
        item_id, _, key = (token or "").partition(":")
        if not item_id.isdigit() or not key:
            raise gr.Error("There is no item on screen to decide; press Refresh.")
        if action == "relabel" and not label:
            raise gr.Error("Pick the right class first (or press its key).")
        try:
            result = self.service.decide(reviewer, int(item_id), action=action,
                                         label=label if action == "relabel" else None, idempotency_key=key)
        except ReviewError as e:
            raise gr.Error(str(e.args[0])) from e
        filters = _filters(reason, predicted, model_version)
        if key != (state or {}).get("key"):
            # The browser sent an item that is no longer on screen (a double press raced the first answer).
            # The service answered from the first decision; nothing new was recorded: keep the current item.
            return self._screen(reviewer, filters, f"Already recorded: {_md(result.message)}", state=state,
                                fresh=False)
        status = _conflict_md(result) if result.status == "conflict" else (
            f"✓ {_md(result.message)}" + (f" ({_md(result.previous_label)} → **{_md(result.label)}**)"
                                          if action == "relabel" else ""))
        return self._screen(reviewer, filters, status, state=state, fresh=True)

    def undo(self, token: str, state, reason, predicted, model_version, request: gr.Request,
             profile: gr.OAuthProfile | None = None) -> Screen:
        reviewer = self._user(request, profile)
        # The key comes from the screen the browser showed: a double press on U undoes once (the service replays
        # the first undo); a press after the answer arrived carries the new screen's key and walks further back.
        key = f"undo:{(token or '').partition(':')[2] or uuid.uuid4().hex}"
        try:
            result = self.service.undo(reviewer, idempotency_key=key)
        except ReviewError as e:
            raise gr.Error(str(e.args[0])) from e
        status = f"↶ {_md(result.message)}"
        # The undone item is handed back to this reviewer; drop the filters so it is shown even if they exclude it.
        filters = _filters(None, None, None) if result.ok else _filters(reason, predicted, model_version)
        return self._screen(reviewer, filters, status, state=state, fresh=result.ok)


CSS = """
#review-image { min-height: 60vh; display: flex; align-items: center; justify-content: center; }
#review-img { width: 100%; height: 72vh; object-fit: contain; }
#review-img.small { image-rendering: pixelated; }  /* enlarge tiny images without blurring their pixels */
#review-empty { font-size: 1.3em; opacity: 0.7; }
#review-keys { font-size: 0.85em; opacity: 0.8; }
"""


def build_review_app(settings, service, vocab) -> gr.Blocks:
    vocab = tuple(vocab)
    h = ReviewHandlers(settings, service, vocab)
    keys = shortcut_keys(vocab)
    choices = [(key_hint(i, name, keys), name) for i, name in enumerate(vocab)]
    with gr.Blocks(title="Loupe · Review", analytics_enabled=False) as app:
        state = gr.State({"item_id": None, "key": None})
        with gr.Row():
            with gr.Column(scale=3):
                image = gr.HTML(elem_id="review-image", js_on_load=None)
            with gr.Column(scale=2):
                with gr.Row(equal_height=True):
                    status = gr.Markdown(elem_id="review-status")
                    # relative link: /review/logout wherever the app is mounted (Gradio's route ends the session)
                    gr.Button("Log out", link="logout", size="sm", scale=0, min_width=80, elem_id="review-logout")
                probs = gr.Label(label="Model's probabilities", num_top_classes=settings.top_k, elem_id="review-probs")
                details = gr.Markdown(elem_id="review-details")
                with gr.Row():
                    confirm = gr.Button("Confirm [Enter]", variant="primary", elem_id="review-confirm", min_width=90)
                    ood = gr.Button("None of these / out of domain [X]", elem_id="review-ood", min_width=90)
                    bad = gr.Button("Bad image [B]", elem_id="review-bad", min_width=90)
                picker = gr.Radio if len(vocab) <= 12 else gr.Dropdown
                choice = picker(choices, label="Relabel as (press the class key to relabel at once)",
                                elem_id="review-relabel-choice")
                with gr.Row():
                    relabel = gr.Button("Relabel", elem_id="review-relabel", min_width=90)
                    skip = gr.Button("Skip [S]", elem_id="review-skip", min_width=90)
                    undo = gr.Button("Undo [U]", elem_id="review-undo", min_width=90)
                # Key targets: one per class with a shortcut, so a key press needs no selection round trip.
                class_buttons = {i: gr.Button(vocab[i], visible="hidden", elem_id=f"review-class-{i}")
                                 for i in sorted(set(keys.values()))}
                gr.Markdown("Keys: **Enter** confirm · **1–9, 0** or a class's first letter relabel · **X** out of "
                            "domain · **B** bad image · **S** skip · **U** undo", elem_id="review-keys")
        with gr.Accordion("Progress and filters", open=True):
            counts = gr.Markdown(elem_id="review-counts")
            with gr.Row():
                reason = gr.Dropdown([("All reasons", "")] + [(n.replace("_", " "), n) for n in REASONS], value="",
                                     label="Reason", elem_id="review-filter-reason")
                predicted = gr.Dropdown([("All classes", "")] + list(vocab), value="", label="Predicted class",
                                        elem_id="review-filter-predicted")
                model = gr.Dropdown([("All models", "")] + service.model_versions(), value="", label="Model version",
                                    elem_id="review-filter-model")
                refresh = gr.Button("Refresh", elem_id="review-refresh")
        token = gr.Textbox(visible="hidden", elem_id="review-token")
        filters = [reason, predicted, model]
        outputs = [image, details, probs, status, token, state, choice]
        # One concurrency group for every review event: they are short DB transactions, and SQLite serialises
        # writers anyway; a handful at once keeps several reviewers responsive.
        opts = dict(outputs=outputs, concurrency_id="review", concurrency_limit=4, api_visibility="private")

        def act(action: str, label: str | None = None):
            def handler(token, state, reason, predicted, model_version, request: gr.Request,
                        profile: gr.OAuthProfile | None = None):
                return h.decide(action, label, token, state, reason, predicted, model_version, request, profile)
            return handler

        def relabel_fn(choice, token, state, reason, predicted, model_version, request: gr.Request,
                       profile: gr.OAuthProfile | None = None):
            return h.decide("relabel", choice, token, state, reason, predicted, model_version, request, profile)

        inputs = [token, state, *filters]
        events = [button.click(act(action), inputs, **opts)
                  for button, action in ((confirm, "confirm"), (ood, "out_of_domain"), (bad, "bad_image"), (skip, "skip"))]
        events += [button.click(act("relabel", vocab[i]), inputs, **opts) for i, button in class_buttons.items()]
        events.append(relabel.click(relabel_fn, [choice, *inputs], **opts))
        events.append(undo.click(h.undo, inputs, **opts))
        events += [trigger(h.show, [state, *filters], **opts)
                   for trigger in (refresh.click, reason.change, predicted.change, model.change, app.load)]
        progress = dict(outputs=counts, concurrency_id="review-progress", concurrency_limit=2,
                        api_visibility="private", show_progress="hidden")
        for event in events:
            event.then(h.progress, None, **progress)  # after the next item is on screen, never before
        gr.Timer(COUNTS_EVERY_S).tick(h.progress, None, **progress)  # other reviewers' progress too
        app.load(None, js=keyboard_js(vocab))
    return app


def review_mount_options(settings) -> dict:
    """auth for ``gr.mount_gradio_app(..., path="/review")``: HF OAuth allowlist on a Space, else accounts."""
    if settings.hf_sign_in:
        return {"auth_dependency": hf_auth_dependency(settings), "css": CSS}
    message = "Reviewers only." if settings.reviewers.strip() else "No reviewer accounts are configured " \
        "(set LOUPE_REVIEWERS; see `python -m review hash-password`)."
    return {"auth": auth_fn(settings), "auth_message": message, "css": CSS}
