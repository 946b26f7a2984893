"""Console progress for long jobs (dataset audit, import, training): a bar with the rate, on stderr.

On a terminal the line is redrawn in place; otherwise (CI logs, a pipe) a plain line is printed every few seconds
and at the end, so a log shows progress without thousands of carriage returns. ``FitProgress`` is the same for a
fastai fit: one line per epoch with the losses, the error rate and the images per second. It is passed to
``fit_one_cycle(cbs=...)`` for that fit only, so an exported learner never references this module.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_BAR = 24


def _fmt_rate(n: float, seconds: float, unit: str) -> str:
    return f"{n / seconds:,.0f} {unit}/s" if seconds > 0 else f"- {unit}/s"


class Progress:
    def __init__(self, total: int, what: str, *, unit: str = "img", stream: TextIO | None = None,
                 enabled: bool = True, interval_s: float | None = None):
        self.total, self.what, self.unit = max(int(total), 0), what, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if interval_s is not None else (0.2 if self.tty else 5.0)
        self.done = 0
        self.start = self._last = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        share = self.done / self.total if self.total else 1.0
        filled = int(round(share * _BAR))
        eta = (self.total - self.done) * elapsed / self.done if self.done else 0.0
        return (f"{self.what:<12} [{'#' * filled}{'.' * (_BAR - filled)}] {self.done:,}/{self.total:,} "
                f"{share:4.0%}  {_fmt_rate(self.done, elapsed, self.unit)}  "
                + (f"ETA {eta:,.0f} s" if self.done < self.total else f"{elapsed:,.1f} s"))

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval_s):
            self._last = now
            self._write(self.line(), final=False)

    def close(self, note: str = "") -> float:
        """Print the final line (with ``note``); returns the rate in units per second."""
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            self._write(self.line() + (f"  {note}" if note else ""), final=True)
        return self.done / elapsed if elapsed > 0 else 0.0

    def _write(self, text: str, *, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def say(message: str, *, stream: TextIO | None = None) -> None:
    """A status line on stderr (stdout stays for the JSON report)."""
    out = stream if stream is not None else sys.stderr
    out.write(message + "\n")
    out.flush()


def fit_progress(title: str, *, enabled: bool = True, stream: TextIO | None = None):
    """A fastai callback printing one line per epoch (and a bar during it on a terminal)."""
    from fastai.callback.core import Callback

    class FitProgress(Callback):
        order = 65  # after the Recorder (50), whose values of this epoch we print

        def before_fit(self):
            self.fit_start = time.perf_counter()

        def before_epoch(self):
            n = len(self.dls.train) * (self.dls.train.bs or 1)
            self.bar = Progress(n, f"{title} e{self.epoch + 1}/{self.n_epoch}", stream=stream,
                                enabled=enabled and bool(getattr(stream or sys.stderr, "isatty", lambda: False)()))

        def after_batch(self):
            if self.training:
                self.bar.update(len(self.xb[0]))

        def after_epoch(self):
            seconds = time.perf_counter() - self.bar.start
            names = [n for n in self.recorder.metric_names[1:-1]]  # drop "epoch" and "time"
            values = self.recorder.values[-1] if self.recorder.values else []
            parts = [f"{n} {v:.4f}" for n, v in zip(names, values, strict=False)]
            if enabled:
                say(f"{title} epoch {self.epoch + 1}/{self.n_epoch}  " + "  ".join(parts)
                    + f"  {_fmt_rate(self.bar.done, seconds, 'img')}  {seconds:.1f} s", stream=stream)

    return FitProgress()
