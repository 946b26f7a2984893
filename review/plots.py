"""The monitoring plots (the Monitor tab and ``python -m review report`` show the same; review/report.py lays them
out). matplotlib's object API (``Figure`` + the Agg canvas): no pyplot state, no display, safe in worker threads.
Each ``*_figure(d)`` takes the period's data (review/period.py) and returns a Figure; ``png`` makes it a data: URL.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from model.reference import aspect, bin_counts, resolution
from review import drift
from review.period import PeriodData

SOURCE_ORDER = ("upload", "webcam", "sketch", "stream", "api")
MAX_CLASS_BARS = 20


def figure(width: float = 7.5, height: float = 2.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80, layout="constrained")


def png(fig) -> str:
    """The figure as a data: URL (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ticks(ax, labels: list[str], max_ticks: int = 12) -> None:
    step = max(1, len(labels) // max_ticks)
    ax.set_xticks(range(0, len(labels), step), [labels[i] for i in range(0, len(labels), step)], rotation=30,
                  ha="right", fontsize=7)


def traffic_figure(d: PeriodData):
    fig = figure()
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
    fig = figure()
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
    fig = figure()
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
    fig = figure(7.5, 2.8)
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
    fig = figure(7.5, 4.6)
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
    fig = figure(7.5, 0.6 + 0.45 * max(1, len(d.accuracy)))
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
    fig = figure()
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
    fig = figure(side, side)
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
    fig = figure(7.5, 1.6)
    ax = fig.add_subplot()
    ax.barh([p[0] for p in parts], [p[1] / 2**30 for p in parts])
    if s["max_bytes"]:
        ax.axvline(s["max_bytes"] / 2**30, color="red", linestyle="--", label="image store cap")
        ax.legend(fontsize=7)
    ax.set_xlabel("GB")
    return fig


# --- HTML ---------------------------------------------------------------------------------------------------------
