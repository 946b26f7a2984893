"""The Monitor tab's page and the self-contained HTML report (``python -m review report``): one renderer for both.

The plots (review/plots.py, drawn server-side) are inlined as base64 PNG ``<img>`` tags, so the HTML needs no
other file and no URL.
Every string that reaches the HTML is escaped; labels drawn into plots are drawn as plain text (no mathtext), so a
class named ``$x$`` is shown as written.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from model.reference import EDGES
from review import drift
from review.period import PeriodData
from review.plots import (
    accuracy_figure,
    classes_figure,
    confidence_figure,
    confusion_figure,
    corrections_figure,
    inputs_figure,
    latency_figure,
    png,
    storage_figure,
    traffic_figure,
)
from review.types import ReviewError

MAX_CONFUSION = 30
CSS = """
.loupe-monitor { font-family: system-ui, sans-serif; max-width: 1100px; }
.loupe-monitor h2 { margin: 1.2em 0 0.3em; font-size: 1.2em; }
.loupe-monitor img { max-width: 100%; height: auto; }
.loupe-monitor table { border-collapse: collapse; margin: 0.4em 0; }
.loupe-monitor td, .loupe-monitor th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.loupe-monitor .banner { padding: 0.6em 1em; border-radius: 6px; margin: 0.5em 0; }
.loupe-monitor .drifting { background: #fde2e1; border: 1px solid #d33; }
.loupe-monitor .calm { background: #e5f5e8; border: 1px solid #3a3; }
.loupe-monitor .quiet { background: #eef; border: 1px solid #99c; }
.loupe-monitor .note { opacity: 0.8; font-size: 0.9em; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _img(fig, alt: str, elem_id: str) -> str:
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        url = png(fig)
    return f'<img id="{esc(elem_id)}" alt="{esc(alt)}" src="{url}">'


def banner(status: dict | None) -> str:
    """The live drift status (review.monitor.DriftStatus.as_dict()) as a banner; '' when there is none."""
    if not status:
        return ""
    models = status.get("models", {})
    alarms = [(v, name, m["checks"][name]) for v, m in models.items() for name in m["alarms"]]
    if alarms:
        items = "".join(f"<li><b>{esc(name)}</b> of {esc(v)}: PSI {c['psi']:.2f} &gt; {c['threshold']:g} over its "
                        f"latest {c['n']:,} predictions</li>" for v, name, c in alarms)
        return (f'<div id="drift-banner" class="banner drifting"><b>Drift:</b> live traffic no longer looks like the '
                f"model's reference data.<ul>{items}</ul></div>")
    text = {"ok": "No drift: live traffic looks like the reference data.",
            "insufficient_data": "Not enough recent traffic yet for drift alarms.",
            "no_reference": "No reference data for the serving model: drift alarms are off "
                            "(python -m model.calibrate <folder|labels.csv>).",
            "starting": "The first drift check has not finished yet."}.get(status.get("status"), "")
    notes = "".join(f"<br><span class='note'>{esc(m['note'])}</span>" for m in models.values() if m.get("note"))
    cls = "calm" if status.get("status") == "ok" else "quiet"
    return f'<div id="drift-banner" class="banner {cls}">{esc(text)}{notes}</div>' if text else ""


def _drift_table(d: PeriodData) -> str:
    if not d.checks:
        return f"<p class='note'>{esc(d.reference_note or 'No reference data.')}</p>"
    rows = "".join(f"<tr><td style='text-align:left'>{esc(c.name)}</td><td>{c.n:,}</td>"
                   f"<td>{'' if c.psi is None else f'{c.psi:.3f}'}</td><td>{c.threshold:g}</td>"
                   f"<td style='text-align:left'>{esc(c.status)}</td></tr>" for c in d.checks)
    return ("<table id='drift-table'><tr><th>check</th><th>predictions</th><th>PSI</th><th>threshold</th>"
            f"<th>status</th></tr>{rows}</table>")


def _accuracy_table(d: PeriodData) -> str:
    if not d.accuracy:
        return "<p class='note'>No reviewed audit items in this period.</p>"
    rows = []
    for v, a in sorted(d.accuracy.items()):
        acc = "–" if a["accuracy"] is None else f"{a['accuracy']:.1%} ({a['low']:.1%}–{a['high']:.1%})"
        rows.append(f"<tr><td style='text-align:left'>{esc(v)}</td><td>{a['reviewed']}</td><td>{a['correct']}</td>"
                    f"<td>{acc}</td><td>{a['excluded']}</td></tr>")
    return ("<table id='accuracy-table'><tr><th>model version</th><th>reviewed</th><th>correct</th>"
            "<th>accuracy (95% interval)</th><th>out of domain / bad</th></tr>" + "".join(rows) + "</table>")


def _agreement_table(d: PeriodData) -> str:
    per = d.confusion["per_class"]
    if not per:
        return "<p class='note'>No reviewed items of this version in the period.</p>"
    rows = "".join(f"<tr><td style='text-align:left'>{esc(c)}</td><td>{p['reviewed']}</td><td>{p['agreed']}</td>"
                   f"<td>{p['agreement']:.0%}</td></tr>" for c, p in per.items())
    return ("<table id='agreement-table'><tr><th>predicted class</th><th>reviewed</th><th>reviewers agreed</th>"
            f"<th>agreement</th></tr>{rows}</table>")


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def sections(d: PeriodData, status: dict | None = None) -> str:
    """The body: banner, then one section per plot (the tab and the report show the same)."""
    out = [banner(status)]
    serving = ", ".join(f"{role}: {v}" for role, v in d.versions.items())
    cap = f" (the latest {len(d.window):,} of the current version)" if d.capped else ""
    out.append(f"<p id='monitor-period'>{esc(d.since.strftime('%Y-%m-%d %H:%M'))} – "
               f"{esc(d.until.strftime('%Y-%m-%d %H:%M'))} UTC · {d.total:,} predictions{esc(cap)} · serving "
               f"{esc(serving)}</p>")
    if not d.total:
        out.append("<p class='note'>No traffic in this period.</p>")
    else:
        out.append("<h2>Traffic by source</h2>" + _img(traffic_figure(d), "traffic over time", "plot-traffic"))
        out.append("<h2>Confidence and the unfamiliar rate</h2>"
                   + _img(confidence_figure(d), "confidence over time", "plot-confidence"))
        out.append("<h2>Latency</h2>" + _img(latency_figure(d), "latency p50 and p95", "plot-latency"))
    out.append(f"<h2>Drift against the reference ({esc(d.version)})</h2>" + _drift_table(d))
    if d.reference is not None and len(d.window):
        if d.reference.section("predictions"):
            out.append("<h2>Predicted classes vs the reference</h2>"
                       + _img(classes_figure(d), "class shares vs reference", "plot-classes"))
        if d.reference.section("inputs"):
            out.append("<h2>Input statistics vs the reference</h2>"
                       + _img(inputs_figure(d), "input statistics vs reference", "plot-inputs"))
    out.append("<h2>Estimated accuracy (random audit sample)</h2>" + _accuracy_table(d))
    if any(a["reviewed"] for a in d.accuracy.values()):
        out.append(_img(accuracy_figure(d), "accuracy with 95% interval", "plot-accuracy"))
    out.append(f"<h2>Human agreement per class ({esc(d.version)}, all reviewed items)</h2>" + _agreement_table(d))
    if d.confusion["reviewed"] and len(d.confusion["classes"]) <= MAX_CONFUSION:
        out.append(_img(confusion_figure(d), "confusion matrix of reviewed items", "plot-confusion"))
    if d.corrections:
        total = sum(n for _, n, _ in d.corrections)
        fixed = sum(k for _, _, k in d.corrections)
        out.append(f"<h2>Feedback loop: answers corrected later</h2><p>{fixed:,} of {total:,} answers "
                   f"({fixed / total:.1%}) were later corrected by their user or a reviewer.</p>"
                   + _img(corrections_figure(d), "share of answers corrected later", "plot-corrections"))
    s = d.storage
    out.append(f"<h2>Storage</h2><p id='monitor-storage'>{s['images']:,} images, {esc(_size(s['image_bytes']))}; "
               f"database {esc(_size(s['database_bytes']))}; free disk {esc(_size(s['free_bytes']))}"
               + (f"; image store cap {esc(_size(s['max_bytes']))}" if s["max_bytes"] else "") + "</p>"
               + _img(storage_figure(d), "storage use", "plot-storage"))
    return f"<div class='loupe-monitor'>{''.join(out)}</div>"


def document(d: PeriodData, status: dict | None = None, title: str = "Loupe monitoring report") -> str:
    """A whole HTML page: no script, no external URL, every image inline."""
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class='note'>Written {esc(made)} by python -m review report.</p>"
            f"{sections(d, status)}</body></html>")


def write(path: Path, d: PeriodData, status: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document(d, status), encoding="utf-8")
    return path


def served_version(settings, store) -> tuple[str, str]:
    """(version, sha256) the app serves: the registry's current version, else the configured model's pin."""
    from model import versions
    from model.loading import model_source

    rec = store.transaction(versions.current, read=True)
    if rec is not None:
        return rec.version, rec.sha256
    src = model_source(settings)
    if not src.sha256_pin:
        raise ReviewError("no current model version in the registry and no LOUPE_MODEL_SHA256: say which model "
                          "with --version")
    sha = src.sha256_pin.strip().lower()
    return versions.version_of(src.name, sha), sha


def write_report(settings, *, since: datetime, until: datetime | None, out: Path, version: str | None = None) -> dict:
    """``python -m review report``: the period's data, the live drift check of the version, one HTML file."""
    from review.db import Model, utcnow
    from review.monitor import DriftStatus, References, check_version
    from review.period import collect
    from review.store import ReviewStore

    until = until or utcnow()
    if until <= since:
        raise ReviewError("--until must be after --since")
    store = ReviewStore(settings)
    try:
        if version is None:
            version, sha = served_version(settings, store)
        else:
            sha = store.transaction(lambda s: s.scalar(select(Model.sha256).where(Model.version == version)),
                                    read=True)
            if sha is None:
                raise ReviewError(f"unknown model version {version!r} (no prediction was ever logged for it)")
        refs = References(settings.data_dir)
        now = utcnow()
        live = DriftStatus(now, (check_version(store, settings, refs, drift.Thresholds.from_settings(settings),
                                               version=version, sha256=sha, role="current", now=now),))
        data = store.transaction(lambda s: collect(s, settings, version=version, since=since, until=until,
                                                   references=refs), read=True)
    finally:
        store.close()
    path = write(out, data, live.as_dict())
    return {"out": str(path), "bytes": path.stat().st_size, "version": version, "predictions": data.total,
            "drift": live.status}


__all__ = ["EDGES", "banner", "document", "sections", "write", "write_report"]
