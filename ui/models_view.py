"""What the Models tab shows: plain functions from registry and rollout values to HTML (ui.models_tab puts them on
screen). Version names, notes, class names and reviewer names come from people and datasets: everything is escaped.
"""

from __future__ import annotations

import base64
import io
from html import escape as e

from PIL import Image

THUMB_SIDE = 160

STATUS_BADGE = {"current": "<b>current</b>", "shadow": "<i>shadow</i>", "canary": "<i>canary</i>"}


def _pct(x) -> str:
    return "–" if x is None else f"{x:.2%}"


def _when(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t is not None else "–"


def versions_table(records, *, overridden: set[str]) -> str:
    """Every version, newest first: status, sha256, parent, created, note, held-out error rate, images."""
    if not records:
        return "<p>No versions registered yet.</p>"
    rows = []
    for r in reversed(records):
        counts = r.data.get("counts", {})
        warn = ' <b title="promoted although the gate refused">⚠ promoted over a failed gate</b>' \
            if r.version in overridden else ""
        rows.append(
            f"<tr><td><code>{e(r.version)}</code></td><td>{STATUS_BADGE.get(r.status, e(r.status))}{warn}</td>"
            f"<td><code title=\"{e(r.sha256)}\">{e(r.sha256[:16])}…</code></td><td>{e(r.parent or '–')}</td>"
            f"<td>{_when(r.created)}</td><td>{_pct(r.error_rate)}</td><td>{counts.get('total', '–')}</td>"
            f"<td>{e(r.note)}</td></tr>")
    return ('<table id="models-versions"><tr><th>version</th><th>status</th><th>sha256</th><th>parent</th>'
            "<th>created (UTC)</th><th>held-out error</th><th>images</th><th>note</th></tr>"
            + "".join(rows) + "</table>")


def serving_html(routes, shadow: dict | None, follower: dict | None) -> str:
    """What THIS replica serves now, the shadow queue, and how it follows the registry."""
    v = routes.versions()
    parts = [f"Serving <code>{e(v['current'])}</code>"]
    if "shadow" in v:
        parts.append(f"shadow <code>{e(v['shadow'])}</code>")
    if "canary" in v:
        parts.append(f"canary <code>{e(v['canary'])}</code> for {routes.canary_share:.0%} of sessions")
    line = " · ".join(parts)
    if shadow is not None and "shadow" in v:
        line += (f"<br><small>shadow scoring: {shadow['scored']} scored, {shadow['dropped']} not shadowed (queue "
                 f"full), {shadow['failed']} failed, {shadow['waiting']} waiting</small>")
    if follower:
        line += f"<br><small>follows the registry every {follower['poll_s']:g} s"
        if follower.get("error"):
            line += f' · <b style="color:#b91c1c">{e(follower["error"])}</b>'
        line += "</small>"
    return f'<div id="models-serving">{line}</div>'


def gate_html(result, *, heading: str = "") -> str:
    """Every check: passed or not, what it measured, in one table."""
    verdict = ("<b style=\"color:#15803d\">PASSED</b>" if result.passed
               else "<b style=\"color:#b91c1c\">REFUSED</b> (" + e(", ".join(result.failed)) + ")")
    rows = "".join(
        f"<tr><td>{'✅' if c.passed else '❌'}</td><td>{e(c.title)}</td><td>{e(c.summary)}</td></tr>"
        for c in result.checks)
    return (f'<div id="models-gate">{heading}<p>Gate for <code>{e(result.candidate)}</code> against '
            f"<code>{e(result.current)}</code>: {verdict}. Rule: no worse than the current model by more than "
            f"{result.margin:.0%} accuracy at 95% confidence, on the same items.</p>"
            f"<table><tr><th></th><th>check</th><th>what it measured</th></tr>{rows}</table></div>")


def compare_html(cmp: dict) -> str:
    a, b = cmp["a"], cmp["b"]
    rows = "".join(
        f"<tr><td>{e(str(c))}</td><td>{_pct(v['precision']['a'])}</td><td>{_pct(v['precision']['b'])}</td>"
        f"<td>{_pct(v['recall']['a'])}</td><td>{_pct(v['recall']['b'])}</td>"
        f"<td>{cmp['images_by_class'].get(c, {}).get('a', 0)}</td>"
        f"<td>{cmp['images_by_class'].get(c, {}).get('b', 0)}</td></tr>"
        for c, v in cmp["per_class"].items())
    return (f'<div id="models-compare"><p>A <code>{e(a["version"])}</code> ({e(a["status"])}), held-out error '
            f"{_pct(cmp['error_rate']['a'])} · B <code>{e(b['version'])}</code> ({e(b['status'])}), held-out error "
            f"{_pct(cmp['error_rate']['b'])} · {e(cmp['lineage'])} · {e(cmp['caveat'])}</p>"
            "<table><tr><th>class</th><th>precision A</th><th>precision B</th><th>recall A</th><th>recall B</th>"
            f"<th>images A</th><th>images B</th></tr>{rows}</table></div>")


def thumbnail(data: bytes) -> str:
    """An inline data: URL (never a file URL: see ui.review_tab on why stored images stay out of Gradio's cache)."""
    with Image.open(io.BytesIO(data)) as img:
        shown = img.convert("RGB")
    shown.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    shown.save(buf, "PNG")
    return f'<img alt="shadowed image" style="image-rendering:pixelated;width:{THUMB_SIDE}px" ' \
           f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def disagreements_html(rows: list[dict], images, *, more: bool) -> str:
    """The shadow disagreements not looked at yet: the image, what the user was told, what the candidate says."""
    if not rows:
        return '<div id="models-disagreements"><p>No disagreements left to look at.</p></div>'
    cells = []
    for r in rows:
        try:
            img = thumbnail(images.read(r["image_sha256"])) if r["image_sha256"] else "<i>image not stored</i>"
        except (OSError, ValueError):  # purged, missing or unreadable: the labels are still worth seeing
            img = "<i>image no longer stored</i>"
        cells.append(f'<figure style="display:inline-block;margin:6px">{img}<figcaption>#{r["id"]}: served '
                     f"<b>{e(r['served_label'])}</b>, candidate <b>{e(r['predicted'])}</b> "
                     f"({r['confidence']:.0%})</figcaption></figure>")
    tail = "<p>More after these: mark these as looked at to see the next ones.</p>" if more else ""
    return f'<div id="models-disagreements"><p>{len(rows)} disagreements:</p>{"".join(cells)}{tail}</div>'


def history_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>No rollout actions yet.</p>"
    out = []
    for r in rows:
        extra = []
        if r["share"] is not None:
            extra.append(f"share {r['share']:.0%}")
        if r["against"]:
            extra.append(f"against {e(r['against'])}")
        if r["gate_passed"] is not None:
            extra.append("gate passed" if r["gate_passed"] else "<b>gate FAILED</b>")
        if r["override"]:
            extra.append(f"<b>⚠ OVERRIDE: {e(r['override'])}</b>")
        if r["note"]:
            extra.append(e(r["note"]))
        out.append(f"<tr><td>{_when(r['time'])}</td><td>{e(r['by'])}</td><td>{e(r['action'])}</td>"
                   f"<td><code>{e(r['version'])}</code></td><td>{' · '.join(extra)}</td></tr>")
    return ('<table id="models-history"><tr><th>time (UTC)</th><th>by</th><th>action</th><th>version</th>'
            f"<th>details</th></tr>{''.join(out)}</table>")
