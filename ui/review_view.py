"""What a reviewer reads: the image as an inline data: URL, the item's details, statuses, progress and counts.

Plain functions from review values to HTML/Markdown; ``ui.review_tab`` puts them on screen. Labels come from users
and dataset files, so every label goes through ``_md`` (Markdown) or ``html.escape`` (HTML).
"""

from __future__ import annotations

import base64
import io
from html import escape as html_escape

from PIL import Image

from review.types import REASON_TEXT, REASONS, DecisionResult, QueueItem
from ui.review_keys import CLAIM

MAX_SIDE = 1280  # reviewers need detail, not the original 40-megapixel file over the wire
SMALL_SIDE = 256  # below this the browser enlarges the image pixelated, not blurred
PASS_THROUGH_BYTES = 400_000  # small stored PNGs/JPEGs are sent as they are: no decode/encode on the hot path


def md(text: object) -> str:
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
    reasons = "\n".join(f"- **{md(r.replace('_', ' '))}**: {REASON_TEXT.get(r, '')}" for r in item.reasons)
    claimed = ", ".join(f"**{md(c)}**" for c in item.claimed_labels) or "none"
    loss = f" · loss {item.loss:.2f}" if item.loss is not None else ""
    second = (f"\n\nSecond opinion: {item.decisions_so_far} of {item.required_decisions} decisions so far"
              if item.required_decisions > 1 else "")
    size = f" · {item.width}×{item.height} px" if item.width and item.height else ""
    return (f"### Model says: {md(item.predicted)} ({item.confidence:.0%})\n\n"
            f"**Label given by a user or the dataset:** {claimed}\n\n**Why it is queued**\n{reasons}\n\n"
            f"<small>margin {item.margin:.2f} · entropy {item.entropy:.2f}{loss} · source {md(item.source)}"
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


def conflict_md(result: DecisionResult) -> str:
    who = "; ".join(f"{md(c.reviewer)}: {c.action.replace('_', ' ')}" + (f" → {md(c.label)}" if c.label else "")
                    + f" at {c.time:%H:%M:%S}" for c in result.conflicts)
    return f"⚠️ **Conflict** — {md(result.message)}" + (f" ({who})" if who else "")


def claims_to_offer(item: QueueItem) -> tuple[str, ...]:
    """Labels users or the dataset gave the item that differ from the prediction and are classes of its model."""
    return tuple(c for c in item.claimed_labels if c != item.predicted and c in item.vocab)


def claim_wording(item: QueueItem) -> str:
    return "The dataset is right" if item.source == "dataset" else CLAIM.wording


def short_label(text: str) -> str:
    """A label inside a button's text (plain text, not Markdown): keep it short."""
    return text if len(text) <= 40 else text[:39] + "…"


def _open_items(n: int) -> tuple[str, str]:
    return ("1 open item", "is") if n == 1 else (f"{n} open items", "are")


def empty_html(p: dict, filtered: bool) -> str:
    """The calm screen of an empty queue; ``p`` is ReviewDesk.progress: why nothing is offered, in plain words."""
    lines = []
    if p["held"]:
        items, verb = _open_items(p["held"])
        lines.append(f"{items} matching your filters {verb} being reviewed by someone else right now; an item "
                     "comes back if they leave it.")
    if p["open"] > p["left"]:
        items, verb = _open_items(p["open"] - p["left"])
        lines.append(f"{items} you decided or skipped {verb} left for other reviewers.")
    if filtered:
        lines.append("Other items may match other filters.")
    lines.append("New items arrive as people use the model; press Refresh to look again.")
    return ('<div id="review-empty"><div class="calm">Nothing to review right now</div>'
            + "".join(f"<p>{html_escape(line)}</p>" for line in lines) + "</div>")


def progress_md(p: dict) -> str:
    if not p["total"]:
        return "**Nothing queued** with these filters"
    return f"**{p['left']} of {p['total']} left** · you decided {p['decided']}"


def done_md(asked: str, result: DecisionResult) -> str:
    if asked == "confirm":
        return f"✓ The model is right: **{md(result.label)}**"
    if asked == "claim":
        return f"✓ The user is right: **{md(result.label)}**"
    if asked == "relabel":
        return f"✓ {md(result.message)} ({md(result.previous_label)} → **{md(result.label)}**)"
    return f"✓ {md(result.message)}"
