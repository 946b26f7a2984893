"""The reviewer-only Models tab (inside the /review app): every version with its status and metrics, a version's
training report, two versions compared, and the rollout: shadow, canary, the shadow disagreements, the promotion
gate, promote, roll back.

Every action is one call to model.rollout, the functions ``python -m model.versions`` uses too; the handlers only
check the reviewer (ui.review_auth.require_reviewer, first thing, in every handler), call, and draw
(ui.models_view). After an action this replica follows the registry at once (``router.refresh()``); the others
within ``LOUPE_ROLLOUT_POLL_S``.

``ModelsHandlers`` is plain Python (tests call it with a fake request); ``render_models`` wires it to components.
"""

from __future__ import annotations

import gradio as gr
from sqlalchemy import select

from model import report, rollout, versions
from model.loading import ModelLoadError
from review.db import RolloutAction
from ui import models_view as view
from ui.review_auth import require_reviewer
from ui.review_view import md

PAGE = 24  # disagreements shown (and marked as looked at) at a time


class ModelsHandlers:
    def __init__(self, settings, store, pipeline):
        self.settings = settings
        self.store = store
        self.router = pipeline.router
        self.shadow_scorer = getattr(pipeline, "shadow", None)

    def _user(self, request, profile) -> str:
        return require_reviewer(request, self.settings, profile)

    def _version(self, version: str | None) -> versions.VersionRecord:
        if not version:
            raise gr.Error("Pick a version first.")
        rec = self.store.transaction(lambda s: versions.get(s, version), read=True)
        if rec is None:
            raise gr.Error(f"Unknown version {version!r}; press Refresh.")
        return rec

    def _do(self, fn, *, follow: bool = True):
        """Run a rollout call: its mistakes become a gr.Error with the message; after a change, this replica
        follows the registry at once (``follow``)."""
        try:
            out = fn()
        except (rollout.RolloutError, versions.VersionError, ModelLoadError) as e:
            raise gr.Error(str(e.args[0])) from e
        if follow:
            self.router.refresh()
        return out

    # --- reading ---------------------------------------------------------------------------------------------
    def overview(self, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """(versions table, serving line, version choices, history)."""
        self._user(request, profile)

        def read(s):
            overridden = set(s.scalars(select(RolloutAction.version).where(RolloutAction.override.is_not(None))))
            return versions.list_versions(s), overridden

        records, overridden = self.store.transaction(read, read=True)
        shadow = self.shadow_scorer.stats() if self.shadow_scorer is not None else None
        choices = [(f"{r.version} ({r.status})", r.version) for r in reversed(records)]
        return (view.versions_table(records, overridden=overridden),
                view.serving_html(self.router.routes(), shadow, self.router.refresher_status()),
                gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=choices),
                view.history_html(rollout.history(self.store, limit=30)))

    def report(self, version: str | None, request: gr.Request, profile: gr.OAuthProfile | None = None) -> str:
        self._user(request, profile)
        rec = versions.located(self._version(version), self.settings)
        return f'<div id="models-report">{report.report_html(rec, self.settings.data_dir)}</div>'

    def compare(self, a: str | None, b: str | None, request: gr.Request,
                profile: gr.OAuthProfile | None = None) -> str:
        self._user(request, profile)
        return view.compare_html(versions.compare(self._version(a), self._version(b)))

    def gate(self, version: str | None, request: gr.Request, profile: gr.OAuthProfile | None = None) -> str:
        self._user(request, profile)
        rec = self._version(version)
        load = rollout.loader(self.settings, self.router)
        result = self._do(lambda: rollout.check_gate(self.store, self.settings, rec.version, load), follow=False)
        return view.gate_html(result)

    def disagreements(self, version: str | None, request: gr.Request,
                      profile: gr.OAuthProfile | None = None) -> tuple[str, dict]:
        """The next page of disagreements nobody has looked at; returns (HTML, what was shown: the version and the
        last id, kept server-side in the session's gr.State for "I have looked at these")."""
        self._user(request, profile)
        rec = self._version(version)
        rows = rollout.unseen_disagreements(self.store, rec.version, limit=PAGE + 1)
        shown = rows[:PAGE]
        return (view.disagreements_html(shown, self.store.images, more=len(rows) > PAGE),
                {"version": rec.version, "upto": shown[-1]["id"] if shown else 0})

    # --- actions ---------------------------------------------------------------------------------------------
    def seen(self, version: str | None, shown: dict | None, request: gr.Request,
             profile: gr.OAuthProfile | None = None) -> str:
        """Record that the reviewer looked at the disagreements last shown to them, of the selected version."""
        who = self._user(request, profile)
        rec = self._version(version)
        shown = shown or {}
        if shown.get("version") != rec.version or not shown.get("upto"):
            raise gr.Error("Show this version's disagreements first: you confirm what you were shown.")
        n = self._do(lambda: rollout.mark_seen(self.store, rec.version, upto=int(shown["upto"]), actor=who))
        return f"Recorded: **{md(who)}** looked at the disagreements of `{rec.version}` ({n} so far)."

    def start_shadow(self, version: str | None, request: gr.Request, profile: gr.OAuthProfile | None = None) -> str:
        who = self._user(request, profile)
        rec = self._version(version)
        self._do(lambda: rollout.start_shadow(self.store, rec.version, actor=who))
        return f"`{rec.version}` runs in shadow: it scores live requests, nobody sees its answers."

    def start_canary(self, version: str | None, share: float, request: gr.Request,
                     profile: gr.OAuthProfile | None = None) -> str:
        who = self._user(request, profile)
        rec = self._version(version)
        share = float(share or 0) / 100
        self._do(lambda: rollout.start_canary(self.store, rec.version, share=share, actor=who))
        return f"`{rec.version}` answers {share:.0%} of the browser sessions (each session keeps its model)."

    def stop(self, request: gr.Request, profile: gr.OAuthProfile | None = None) -> str:
        who = self._user(request, profile)
        rec = self._do(lambda: rollout.stop(self.store, actor=who))
        return f"`{rec.version}` is a plain candidate again." if rec else "No candidate was in shadow or canary."

    def promote(self, version: str | None, confirmed: bool, override: str | None, request: gr.Request,
                profile: gr.OAuthProfile | None = None) -> tuple[str, str]:
        """(status, gate HTML): the gate runs again here, whatever was shown before."""
        who = self._user(request, profile)
        rec = self._version(version)
        if not confirmed:
            raise gr.Error("Tick “I confirm” first: a person confirms every promotion.")
        load = rollout.loader(self.settings, self.router)
        try:
            done = rollout.promote(self.store, self.settings, rec.version, actor=who, confirmed=True, load=load,
                                   override=override)
        except rollout.GateRefused as e:
            return (f"**Refused by the gate** ({md(', '.join(e.result.failed))}). Nothing changed. To promote "
                    "anyway, give an override reason (recorded with your name).",
                    view.gate_html(e.result))
        except (rollout.RolloutError, versions.VersionError, ModelLoadError) as e:
            raise gr.Error(str(e.args[0])) from e
        self.router.refresh()
        flag = f" ⚠ **over a failed gate** (reason recorded: {md(done.override)})" if done.override else ""
        return (f"Promoted `{done.record.version}` by **{md(who)}**{flag}; `{done.replaced.version}` retired. "
                "Roll back with one click below.", view.gate_html(done.gate))

    def rollback(self, request: gr.Request, profile: gr.OAuthProfile | None = None) -> str:
        who = self._user(request, profile)
        done = self._do(lambda: rollout.rollback(self.store, actor=who))
        was = done.replaced.version if done.replaced else "nothing"
        return f"Rolled back by **{md(who)}**: `{done.record.version}` serves again; `{was}` retired."


def models_tab(settings, store, pipeline):
    """(title, render) for ui.review_tab.build_review_app's ``tabs``."""
    return "Models", lambda app: render_models(app, ModelsHandlers(settings, store, pipeline))


def render_models(app: gr.Blocks, h: ModelsHandlers) -> None:
    serving = gr.HTML(elem_id="models-serving-box")
    table = gr.HTML(elem_id="models-table")
    with gr.Row():
        version = gr.Dropdown([], label="Version", elem_id="models-version", allow_custom_value=True, scale=3)
        refresh = gr.Button("Refresh", elem_id="models-refresh", scale=0, min_width=100)
    status = gr.Markdown(elem_id="models-status")
    with gr.Accordion("Roll out", open=True):
        with gr.Row():
            shadow = gr.Button("Shadow", elem_id="models-shadow")
            share = gr.Slider(1, 100, value=round(h.settings.canary_share * 100), step=1, label="Canary share (%)",
                              elem_id="models-share")
            canary = gr.Button("Canary", elem_id="models-canary")
            stop = gr.Button("Stop shadow/canary", elem_id="models-stop")
        with gr.Row():
            show_dis = gr.Button("Show disagreements", elem_id="models-show-disagreements")
            seen = gr.Button("I have looked at these", elem_id="models-seen")
        disagreements = gr.HTML(elem_id="models-disagreements-box")
        shown = gr.State({})
        gate_btn = gr.Button("Check the gate", elem_id="models-check-gate")
        gate = gr.HTML(elem_id="models-gate-box")
        with gr.Row():
            confirm = gr.Checkbox(label="I confirm: promote the selected version", elem_id="models-confirm")
            override = gr.Textbox(label="Override reason (only if the gate refuses; recorded with your name)",
                                  elem_id="models-override", max_length=2000)
        with gr.Row():
            promote = gr.Button("Promote", variant="primary", elem_id="models-promote")
            rollback = gr.Button("Roll back to the previous version", variant="stop", elem_id="models-rollback")
    with gr.Accordion("Report", open=False):
        show_report = gr.Button("Show the selected version's report", elem_id="models-show-report")
        report_box = gr.HTML(elem_id="models-report-box")
    with gr.Accordion("Compare", open=False):
        with gr.Row():
            a = gr.Dropdown([], label="A", elem_id="models-compare-a", allow_custom_value=True)
            b = gr.Dropdown([], label="B", elem_id="models-compare-b", allow_custom_value=True)
            compare = gr.Button("Compare", elem_id="models-compare")
        compare_box = gr.HTML(elem_id="models-compare-box")
    with gr.Accordion("Rollout history", open=False):
        history = gr.HTML(elem_id="models-history-box")

    opts = dict(api_visibility="private", concurrency_id="models", concurrency_limit=2)
    overview = dict(fn=h.overview, inputs=None, outputs=[table, serving, version, a, b, history], **opts)
    app.load(**overview)
    refresh.click(**overview)
    show_report.click(h.report, [version], [report_box], **opts)
    compare.click(h.compare, [a, b], [compare_box], **opts)
    gate_btn.click(h.gate, [version], [gate], **opts)
    show_dis.click(h.disagreements, [version], [disagreements, shown], **opts)
    for event in (
        shadow.click(h.start_shadow, [version], [status], **opts),
        canary.click(h.start_canary, [version, share], [status], **opts),
        stop.click(h.stop, None, [status], **opts),
        seen.click(h.seen, [version, shown], [status], **opts),
        promote.click(h.promote, [version, confirm, override], [status, gate], **opts),
        rollback.click(h.rollback, None, [status], **opts),
    ):
        event.then(**overview)
