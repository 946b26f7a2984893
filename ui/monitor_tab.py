"""The reviewers' Monitor tab: the live drift banner and the period's plots (review/report.py draws them).

Why gr.HTML with inline PNGs and not gr.Image/gr.Plot files: the same reason as the Review tab's image (see
ui/review_tab.py): nothing a reviewer sees is written into Gradio's cache, which the public app serves. The HTML
travels only inside the authenticated event stream.

Cost: the plots are computed when the tab is opened or refreshed, never on a timer, and reviewers share one result
per period for ``ttl_s`` seconds (tests/test_monitor.py measures a refresh at 100k predictions). Every handler
checks the reviewer first (ui.review_auth.require_reviewer).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import gradio as gr
from gradio.context import get_render_context

from review.db import utcnow
from review.period import collect
from review.report import CSS, banner, sections
from ui.review_auth import require_reviewer

PERIODS = {"Last 24 hours": timedelta(days=1), "Last 7 days": timedelta(days=7), "Last 30 days": timedelta(days=30)}
DEFAULT_PERIOD = "Last 7 days"


class MonitorHandlers:
    def __init__(self, settings, monitor, *, ttl_s: float = 10.0, clock=utcnow):
        self.settings = settings
        self.monitor = monitor
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()  # one computation per period at a time; the others wait for its result

    def period_html(self, period: str) -> str:
        if period not in PERIODS:
            raise gr.Error(f"Unknown period {period!r}; choose one of: {', '.join(PERIODS)}.")
        with self._lock:
            hit = self._cache.get(period)
            if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
                return hit[1]
            routes = self.monitor.router.routes()
            until = self.clock()
            data = self.monitor.store.transaction(
                lambda s: collect(s, self.settings, version=routes.current.info.version, since=until - PERIODS[period],
                                  until=until, references=self.monitor.references, versions=routes.versions()),
                read=True)
            body = sections(data)  # the live banner is its own component above (and follows the monitor)
            self._cache[period] = (time.monotonic(), body)
            return body

    def show(self, period: str, request: gr.Request, profile: gr.OAuthProfile | None = None) -> str:
        require_reviewer(request, self.settings, profile)
        return f"<style>{CSS}</style>" + self.period_html(period or DEFAULT_PERIOD)

    def live_banner(self, request: gr.Request, profile: gr.OAuthProfile | None = None) -> str:
        require_reviewer(request, self.settings, profile)
        return f"<style>{CSS}</style><div class='loupe-monitor'>{banner(self.monitor.health())}</div>"


def render_monitor(app: gr.Blocks, settings, monitor) -> None:
    h = MonitorHandlers(settings, monitor)
    tab = get_render_context()  # the gr.Tab being filled: its plots are drawn when it is opened, not on page load
    with gr.Row():
        period = gr.Radio(list(PERIODS), value=DEFAULT_PERIOD, label="Period", elem_id="monitor-period-choice",
                          scale=3)
        refresh = gr.Button("Refresh", elem_id="monitor-refresh", scale=0, min_width=100)
    live = gr.HTML(elem_id="monitor-banner")
    body = gr.HTML("<p>Open this tab or press Refresh to draw the plots.</p>", elem_id="monitor-body")
    # Plots: one computation at a time (the cache then serves the others); the banner reads a snapshot: no wait.
    plots = dict(concurrency_id="monitor", concurrency_limit=1, api_visibility="private")
    quick = dict(concurrency_id="monitor-banner", concurrency_limit=4, api_visibility="private",
                 show_progress="hidden")
    triggers = [refresh.click, period.change] + ([tab.select] if isinstance(tab, gr.Tab) else [app.load])
    for trigger in triggers:
        trigger(h.live_banner, None, live, **quick).then(h.show, [period], body, **plots)
    gr.Timer(30.0).tick(h.live_banner, None, live, **quick)  # follows the background checks while the page is open


def monitor_tabs(settings, monitor) -> list:
    """``build_review_app(tabs=...)`` entries: the Monitor tab when the app has a monitor."""
    if monitor is None:
        return []
    return [("Monitor", lambda app: render_monitor(app, settings, monitor))]
