"""A trained version's report: held-out metrics, the confusion matrix and the top losses as PNGs, what data it
saw, the wall time. Written next to the export (``<data_dir>/models/<sha256>/report/``); ``report_html`` renders
it as one self-contained HTML fragment (PNGs inlined) for the reviewer-only Models tab.

Files: ``report.json`` (everything below as data), ``confusion.png``, ``top_losses.png``, ``data.csv`` (every
training image: sha256, label, source, split: the data snapshot the version was trained on).
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

import numpy as np

CONFUSION = "confusion.png"
TOP_LOSSES = "top_losses.png"
REPORT_JSON = "report.json"
DATA_CSV = "data.csv"


def write_data_csv(path: Path, items, valid: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_sha256", "label", "source", "split"])
        for it, v in zip(items, valid, strict=True):
            w.writerow([it.sha256, it.label, it.source, "valid" if v else "train"])


def _confusion_png(path: Path, cm: np.ndarray, vocab) -> None:
    from matplotlib.figure import Figure  # Figure, not pyplot: no global backend state, headless by construction

    n = len(vocab)
    side = min(2.5 + 0.45 * n, 14)
    fig = Figure(figsize=(side, side), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), [str(v) for v in vocab], rotation=90 if n > 8 else 0)
    ax.set_yticks(range(n), [str(v) for v in vocab])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title("Confusion matrix (held-out split)")
    if n <= 30:
        top = cm.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)


def _top_losses_png(path: Path, evaluation, k: int = 9) -> list[dict]:
    from matplotlib.figure import Figure
    from PIL import Image

    probs, targets, vocab = evaluation.probs, evaluation.targets, evaluation.vocab
    if len(targets) == 0:
        return []
    losses = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0))
    order = np.argsort(-losses, kind="stable")[:k]
    rows = []
    cols = 3
    fig = Figure(figsize=(3 * cols, 3.2 * ((len(order) + cols - 1) // cols)), dpi=80)
    for n, i in enumerate(order):
        pred = int(probs[i].argmax())
        rows.append({"image_sha256": evaluation.items[i].sha256, "actual": vocab[targets[i]],
                     "predicted": vocab[pred], "loss": round(float(losses[i]), 4),
                     "probability": round(float(probs[i, pred]), 4)})
        ax = fig.add_subplot((len(order) + cols - 1) // cols, cols, n + 1)
        with Image.open(evaluation.items[i].path) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
        ax.set_title(f"{vocab[pred]}/{vocab[targets[i]]}\n{losses[i]:.2f}/{probs[i, pred]:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Top losses: predicted/actual, loss/probability")
    fig.tight_layout()
    fig.savefig(path)
    return rows


def write_report(out_dir: Path, *, evaluation, metrics: dict, snapshot: dict, recipe: dict, seconds: float,
                 parent: str | None, fine_tuned: bool) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _confusion_png(out_dir / CONFUSION, np.asarray(metrics["confusion"]), evaluation.vocab)
    top = _top_losses_png(out_dir / TOP_LOSSES, evaluation)
    report = {"metrics": metrics, "data": snapshot, "recipe": recipe, "train_seconds": round(seconds, 1),
              "parent": parent, "fine_tuned": fine_tuned, "top_losses": top}
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    return report


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: not available</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def report_html(record, data_dir: Path) -> str:
    """What the Models tab shows for one version (model.versions.VersionRecord); every label is escaped: class
    names come from datasets and reviewers."""
    out = record.report_dir(data_dir)
    try:
        report = json.loads((out / REPORT_JSON).read_text())
    except (OSError, ValueError):
        report = {"metrics": record.metrics, "data": record.data}
    e = html.escape
    m = report.get("metrics") or {}
    counts = (report.get("data") or {}).get("counts", {})
    rows = "".join(
        f"<tr><td>{e(str(c))}</td><td>{_fmt(v.get('precision'))}</td><td>{_fmt(v.get('recall'))}</td>"
        f"<td>{v.get('support', '')}</td><td>{counts.get('by_class', {}).get(c, '')}</td></tr>"
        for c, v in (m.get("per_class") or {}).items())
    sources = ", ".join(f"{e(s)} {n}" for s, n in (counts.get("by_source") or {}).items())
    err = m.get("error_rate")
    head = (f"<h3>{e(record.version)} <small>({e(record.status)})</small></h3>"
            f"<p>Held-out error rate <b>{_fmt(err)}</b> on {m.get('n_valid', '?')} images · trained on "
            f"{counts.get('total', '?')} images ({sources}) · parent {e(record.parent or 'none')}"
            f"{' (fine-tuned)' if report.get('fine_tuned') else ''} · {report.get('train_seconds', '?')} s</p>")
    if record.note:
        head += f"<p>{e(record.note)}</p>"
    table = ("<table><tr><th>class</th><th>precision</th><th>recall</th><th>held out</th><th>trained on</th></tr>"
             f"{rows}</table>")
    return head + table + _img(out / CONFUSION, "confusion matrix") + _img(out / TOP_LOSSES, "top losses")
