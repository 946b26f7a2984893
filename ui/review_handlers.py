"""What the Review tab does, as plain Python (tests call it without a server): the item on screen, a decision, undo,
progress and filters, each as a ``Screen`` of every output. ui/review_tab.py lays the components out and wires them.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, NamedTuple

import gradio as gr

from review.types import ReviewError
from ui.review_auth import require_reviewer
from ui.review_keys import (
    ACTIONS,
    BAD_IMAGE,
    CLAIM,
    CONFIRM,
    OUT_OF_DOMAIN,
    SKIP,
    UNDO,
    button_label,
    class_hint,
    keymap_html,
    keys_line,
    shortcut_keys,
)
from ui.review_view import (
    claim_wording,
    claims_to_offer,
    conflict_md,
    counts_md,
    done_md,
    empty_html,
    image_html,
    item_details,
    md,
    progress_md,
    short_label,
)


class Screen(NamedTuple):
    """Every output of every review event, in ``build_review_app``'s output order."""

    image: str  # HTML
    details: str  # Markdown: prediction, reasons, claimed labels, model
    probs: dict  # gr.Label update: the top-k probabilities, hidden when no item is on screen
    status: str  # Markdown: last action, conflicts, who is signed in
    token: str  # "<item_id>:<idempotency key>" of the item on screen, round-tripped by the browser
    state: dict  # item_id, key, claims: the labels "the user is right" may record for the item on screen
    choice: Any  # relabel selection, cleared for each item
    keys: str  # HTML: the keys line and the item's hidden keymap, which the keyboard script reads
    buttons: tuple  # updates of the confirm, claim, out-of-domain, bad-image, skip and undo buttons


EMPTY_STATE = {"item_id": None, "key": None, "claims": []}


def _filters(reason: str | None, predicted: str | None, model_version: str | None) -> dict:
    return {"reason": reason or None, "predicted": predicted or None, "model_version": model_version or None}


class ReviewHandlers:
    def __init__(self, settings, desk, *, counts_ttl_s: float = 2.0):
        self.settings = settings
        self.desk = desk
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
            item = self.desk.next_item(reviewer, **filters)
        except ReviewError as e:
            raise gr.Error(str(e.args[0])) from e
        if item is None:
            return self._empty(reviewer, filters, status)
        same = state is not None and state.get("item_id") == item.item_id and not fresh
        key = state["key"] if same else uuid.uuid4().hex
        try:
            html = image_html(self.desk.image_bytes(item.image_sha256), f"Queued image {item.image_sha256[:12]}")
        except ReviewError as e:  # purged or lost file: still decidable (bad image, skip), so say so and go on
            html = f'<div id="review-missing">{md(e.args[0])}</div>'
        # Each item is shown and decided in the classes of the model that queued it, keys included.
        claims = claims_to_offer(item)
        keys = shortcut_keys(item.vocab)
        choices = [(class_hint(i, name, keys) + ("  · the user's label" if name in claims else ""), name)
                   for i, name in enumerate(item.vocab)]
        probs = dict(list(item.probs.items())[: self.settings.top_k])
        wording = claim_wording(item)
        buttons = (
            gr.update(value=button_label(CONFIRM, item.vocab, short_label(item.predicted))),
            gr.update(value=button_label(CLAIM, item.vocab, short_label(claims[0]), wording) if len(claims) == 1
                      else wording, visible=len(claims) == 1),
            *(gr.update(value=button_label(a, item.vocab)) for a in (OUT_OF_DOMAIN, BAD_IMAGE, SKIP, UNDO)),
        )
        return Screen(html, item_details(item), gr.update(value=probs, visible=True), status,
                      f"{item.item_id}:{key}", {"item_id": item.item_id, "key": key, "claims": list(claims)},
                      gr.update(choices=choices, value=None),
                      keys_line(item.vocab, claims=claims, claim_wording=wording)
                      + keymap_html(item.vocab, claim=len(claims) == 1), buttons)

    def _empty(self, reviewer: str, filters: dict, status: str) -> Screen:
        """The calm screen of an empty queue: what is left elsewhere, and the keys that still mean something."""
        html = empty_html(self.desk.progress(reviewer, **filters), filtered=any(filters.values()))
        buttons = (gr.update(value=CONFIRM.wording), gr.update(value=CLAIM.wording, visible=False),
                   *(gr.update(value=button_label(a, ())) for a in (OUT_OF_DOMAIN, BAD_IMAGE, SKIP, UNDO)))
        keys = ('<div id="review-keys-line">Nothing on screen to decide. Keys: <kbd>U</kbd> undo your last '
                "decision</div>" + keymap_html(()))
        return Screen(html, "", gr.update(value=None, visible=False), status, "", dict(EMPTY_STATE),
                      gr.update(choices=[], value=None), keys, buttons)

    def progress(self, reason, predicted, model_version, request: gr.Request,
                 profile: gr.OAuthProfile | None = None) -> tuple[str, str]:
        """The reviewer's "k of N left" line for their filters (fresh), and the shared counts (chained after each
        event, and on a timer)."""
        reviewer = self._user(request, profile)
        try:
            mine = self.desk.progress(reviewer, **_filters(reason, predicted, model_version))
        except ReviewError as e:
            raise gr.Error(str(e.args[0])) from e
        with self._counts_lock:  # one recount at a time; the others wait for it and reuse it
            now = time.monotonic()
            if self._counts is None or now - self._counts[0] >= self.counts_ttl_s:
                self._counts = (now, self.desk.counts())
            counts = self._counts[1]
        return progress_md(mine), counts_md(counts, reviewer)

    def filter_choices(self, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """The filters' choices: every class and model version registered so far."""
        self._user(request, profile)
        return (gr.update(choices=[("All classes", "")] + self.desk.classes()),
                gr.update(choices=[("All models", "")] + self.desk.model_versions()))

    def show(self, state, reason, predicted, model_version, request: gr.Request,
             profile: gr.OAuthProfile | None = None) -> Screen:
        """Page load, filter change, refresh."""
        reviewer = self._user(request, profile)
        return self._screen(reviewer, _filters(reason, predicted, model_version),
                            f"Signed in as **{md(reviewer)}**", state=state, fresh=False)

    def decide(self, action: str, label: str | None, token: str, state, reason, predicted, model_version,
               request: gr.Request, profile: gr.OAuthProfile | None = None) -> Screen:
        """``action``: one of review.types.ACTIONS, or "claim" (the user is right: a relabel to the one label a
        user or the dataset gave the item on screen, different from the prediction)."""
        reviewer = self._user(request, profile)
        filters = _filters(reason, predicted, model_version)
        state = state or dict(EMPTY_STATE)
        if not token:  # a key pressed on the empty screen: say so quietly and look again
            wording = next((a.wording for a in ACTIONS if a.name == action), "Relabel")
            return self._screen(reviewer, filters, f"Nothing to decide (“{md(wording)}”): no item was on screen.",
                                state=state, fresh=False)
        item_id, _, key = token.partition(":")
        if not item_id.isdigit() or not key:
            raise gr.Error("There is no item on screen to decide; press Refresh.")
        on_screen = key == state.get("key")
        asked = action
        if action == "claim":
            # The label comes from the server's state of the item on screen, never from the browser. A stale press
            # (the screen moved on) can only replay its recorded decision, and a replay ignores the label.
            claims = (state.get("claims") or []) if on_screen else []
            if on_screen and len(claims) != 1:
                raise gr.Error("No single label was given for this item; press the key of the right class.")
            action, label = "relabel", (claims[0] if claims else None)
        elif action == "relabel" and not label:
            raise gr.Error("Pick the right class first (or press its key).")
        try:
            result = self.desk.decide(reviewer, int(item_id), action=action,
                                      label=label if action == "relabel" else None, idempotency_key=key)
        except ReviewError as e:
            if not on_screen:  # a late press for an item that has left the screen: nothing to undo or fix
                return self._screen(reviewer, filters, "That item has left the screen; nothing was recorded.",
                                    state=state, fresh=False)
            raise gr.Error(str(e.args[0])) from e
        if not on_screen:
            # The browser sent an item that is no longer on screen (a double press raced the first answer).
            # The service answered from the first decision; nothing new was recorded: keep the current item.
            return self._screen(reviewer, filters, f"Already recorded: {md(result.message)}", state=state,
                                fresh=False)
        status = conflict_md(result) if result.status == "conflict" else done_md(asked, result)
        return self._screen(reviewer, filters, status, state=state, fresh=True)

    def undo(self, token: str, state, reason, predicted, model_version, request: gr.Request,
             profile: gr.OAuthProfile | None = None) -> Screen:
        reviewer = self._user(request, profile)
        # The key comes from the screen the browser showed: a double press on U undoes once (the service replays
        # the first undo); a press after the answer arrived carries the new screen's key and walks further back.
        key = f"undo:{(token or '').partition(':')[2] or uuid.uuid4().hex}"
        try:
            result = self.desk.undo(reviewer, idempotency_key=key)
        except ReviewError as e:
            raise gr.Error(str(e.args[0])) from e
        status = f"↶ {md(result.message)}"
        # The undone item is handed back to this reviewer; drop the filters so it is shown even if they exclude it.
        filters = _filters(None, None, None) if result.ok else _filters(reason, predicted, model_version)
        return self._screen(reviewer, filters, status, state=state, fresh=result.ok)
