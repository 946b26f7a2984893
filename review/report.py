"""The Monitor tab's plots and the self-contained HTML report (``python -m review report``): one renderer for both.

Plots are drawn server-side with matplotlib's object API (``Figure`` + the Agg canvas: no pyplot state, no display,
safe in worker threads) and inlined as base64 PNG ``<img>`` tags, so the HTML needs no other file and no URL.
Every string that reaches the HTML is escaped; labels drawn into plots are drawn as plain text (no mathtext), so a
class named ``$x$`` is shown as written.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select

from model.reference import EDGES, aspect, bin_counts, resolution
from review import drift
from review.period import PeriodData
from review.types import ReviewError

SOURCE_ORDER = ("upload", "webcam", "sketch", "stream", "api")
MAX_CLASS_BARS = 20
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


# --- figures ------------------------------------------------------------------------------------------------------
def _figure(width: float = 7.5, height: float = 2.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80, layout="constrained")


def png(fig) -> str:
    """The figure as a data: URL (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(fig, alt: str, elem_id: str) -> str:
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        url = png(fig)
    return f'<img id="{esc(elem_id)}" alt="{esc(alt)}" src="{url}">'


def _ticks(ax, labels: list[str], max_ticks: int = 12) -> None:
    step = max(1, len(labels) // max_ticks)
    ax.set_xticks(range(0, len(labels), step), [labels[i] for i in range(0, len(labels), step)], rotation=30,
                  ha="right", fontsize=7)


def traffic_figure(d: PeriodData):
    fig = _figure()
    ax = fig.add_subplot()
    buckets = sorted(d.traffic)
    bottom = np.zeros(len(buckets))
    sources = [s for s in SOURCE_ORDER if any(s in d.traffic[b] for b in buckets)]
    for s in sources:
        v = np.array([d.traffic[b].get(s, 0) for b in buckets], dtype=float)
        ax.bar(range(len(buckets)), v, bottom=bottom, label=s)
        bottom += v
    _ticks(ax, buckets)
    ax.set_ylabel(f"predictions / {d.bucket}")
    if sources:
        ax.legend(fontsize=7, ncols=len(sources))
    return fig


def confidence_figure(d: PeriodData):
    fig = _figure()
    ax = fig.add_subplot()
    buckets = [r[0] for r in d.confidence]
    x = range(len(buckets))
    ax.plot(x, [r[2] for r in d.confidence], marker=".", label="mean confidence")
    ax.plot(x, [r[3] for r in d.confidence], marker=".", label=f"share below {d.low_confidence:g}")
    if any(r[4] is not None for r in d.confidence):
        ax.plot(x, [np.nan if r[4] is None else r[4] for r in d.confidence], marker=".", label="unfamiliar rate")
    ax.set_ylim(0, 1.02)
    _ticks(ax, buckets)
    ax.legend(fontsize=7)
    return fig


def latency_figure(d: PeriodData):
    fig = _figure()
    ax = fig.add_subplot()
    buckets = [r[0] for r in d.latency]
    ax.plot(range(len(buckets)), [r[2] for r in d.latency], marker=".", label="p50")
    ax.plot(range(len(buckets)), [r[3] for r in d.latency], marker=".", label="p95")
    ax.set_ylabel("ms (decode + model)")
    ax.set_ylim(bottom=0)
    _ticks(ax, buckets)
    ax.legend(fontsize=7)
    return fig


def _bars(ax, labels, ref, win, title):
    x = np.arange(len(labels))
    ax.bar(x - 0.2, ref, 0.4, label="reference")
    ax.bar(x + 0.2, win, 0.4, label="period")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)


def classes_figure(d: PeriodData):
    ref = d.reference.section("predictions")["class_counts"]
    vocab = list(ref)
    ref_sh = np.array(list(ref.values()), dtype=float)
    ref_sh /= max(ref_sh.sum(), 1)
    index = {c: i for i, c in enumerate(vocab)}
    win = np.bincount([index[c] for c in d.window.predicted if c in index], minlength=len(vocab)).astype(float)
    win /= max(win.sum(), 1)
    order = np.argsort(-np.abs(win - ref_sh), kind="stable")[:MAX_CLASS_BARS]
    order = sorted(order) if len(vocab) <= MAX_CLASS_BARS else order
    fig = _figure(7.5, 2.8)
    ax = fig.add_subplot()
    title = "predicted-class shares" + ("" if len(vocab) <= MAX_CLASS_BARS else
                                        f" ({MAX_CLASS_BARS} classes that moved most)")
    _bars(ax, [vocab[i] for i in order], ref_sh[order], win[order], title)
    ax.legend(fontsize=7)
    return fig


def inputs_figure(d: PeriodData):
    inputs = d.reference.section("inputs")
    w = d.window
    values = {"brightness": w.brightness, "resolution": resolution(w.width, w.height),
              "aspect": aspect(w.width, w.height)}
    fig = _figure(7.5, 4.6)
    axes = fig.subplots(2, 2).ravel()
    for ax, name in zip(axes[:3], ("brightness", "resolution", "aspect"), strict=True):
        hist = inputs[name]
        ref = np.array(hist["counts"], dtype=float)
        win = bin_counts(values[name], hist["edges"]).astype(float)
        _bars(ax, list(drift.bin_labels(hist["edges"])), ref / max(ref.sum(), 1), win / max(win.sum(), 1),
              {"resolution": "resolution (√(w·h) px)", "aspect": "aspect ratio (w/h)"}.get(name, name))
    grey = inputs["greyscale"]
    sat = w.saturation[~np.isnan(w.saturation)]
    ref_grey = grey["grey"] / max(grey["grey"] + grey["colour"], 1)
    win_grey = float((sat < grey["threshold"]).mean()) if len(sat) else 0.0
    _bars(axes[3], ["greyscale", "colour"], [ref_grey, 1 - ref_grey], [win_grey, 1 - win_grey], "greyscale share")
    axes[0].legend(fontsize=7)
    return fig


def accuracy_figure(d: PeriodData):
    fig = _figure(7.5, 0.6 + 0.45 * max(1, len(d.accuracy)))
    ax = fig.add_subplot()
    rows = [(v, a) for v, a in sorted(d.accuracy.items()) if a["reviewed"]]
    for i, (_, a) in enumerate(rows):
        ax.errorbar([a["accuracy"]], [i], xerr=[[a["accuracy"] - a["low"]], [a["high"] - a["accuracy"]]], fmt="o",
                    capsize=4)
    ax.set_yticks(range(len(rows)), [f"{v} (n={a['reviewed']})" for v, a in rows], fontsize=7)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("accuracy on the reviewed audit sample, 95% Wilson interval")
    return fig


def corrections_figure(d: PeriodData):
    fig = _figure()
    ax = fig.add_subplot()
    buckets = [r[0] for r in d.corrections]
    ax.plot(range(len(buckets)), [k / n if n else np.nan for _, n, k in d.corrections], marker=".")
    ax.set_ylabel("share corrected later")
    ax.set_ylim(bottom=0)
    _ticks(ax, buckets)
    return fig


def confusion_figure(d: PeriodData):
    m = np.array(d.confusion["matrix"])
    classes = d.confusion["classes"]
    side = min(7.5, 1.5 + 0.35 * len(classes))
    fig = _figure(side, side)
    ax = fig.add_subplot()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("model's prediction")
    ax.set_ylabel("reviewers' label")
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > m.max() / 2 else "black")
    return fig


def storage_figure(d: PeriodData):
    s = d.storage
    parts = [("images", s["image_bytes"]), ("database", s["database_bytes"] or 0)]
    fig = _figure(7.5, 1.6)
    ax = fig.add_subplot()
    ax.barh([p[0] for p in parts], [p[1] / 2**30 for p in parts])
    if s["max_bytes"]:
        ax.axvline(s["max_bytes"] / 2**30, color="red", linestyle="--", label="image store cap")
        ax.legend(fontsize=7)
    ax.set_xlabel("GB")
    return fig


# --- HTML ---------------------------------------------------------------------------------------------------------
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
