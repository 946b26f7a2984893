"""One answer panel per input tab: the prediction, its details line and the "Is this right?" feedback.

Each tab owns its panel and its prediction state, so a tab never shows another tab's answer or "Thanks, noted",
and the page's layout is the same whichever tab is open: nothing is shown or hidden on a tab change, so nothing
(the Sketchpad above all) is measured while the layout shifts.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr


@dataclass(frozen=True)
class ResultPanel:
    label: gr.Label
    info: gr.Markdown
    state: gr.State  # the last answer of this tab: {"id", "label", "model", "classes"}
    yes: gr.Button
    no: gr.Button
    claimed: gr.Dropdown
    status: gr.Markdown

    @property
    def answer_outputs(self) -> list:
        return [self.label, self.info, self.state]


def result_panel(settings, prefix: str = "") -> ResultPanel:
    """Build the panel in the current layout context. ``prefix`` keeps elem_ids unique per tab (the Upload tab's
    panel has the plain ids: #prediction-label, #feedback-status, ...)."""
    with gr.Column(scale=2, min_width=260, elem_id=f"{prefix}result", elem_classes=["result-panel"]):
        label = gr.Label(num_top_classes=settings.top_k, label="Prediction", elem_id=f"{prefix}prediction-label")
        info = gr.Markdown(elem_id=f"{prefix}prediction-info")
        with gr.Group(elem_id=f"{prefix}feedback"):
            gr.Markdown("**Is this right?**")
            with gr.Row():
                yes = gr.Button("Yes", size="sm", elem_id=f"{prefix}feedback-yes")
                no = gr.Button("No", size="sm", elem_id=f"{prefix}feedback-no")
            claimed = gr.Dropdown(choices=[], value=None, label="The right answer is …",
                                  elem_id=f"{prefix}feedback-label", interactive=True)
        status = gr.Markdown(elem_id=f"{prefix}feedback-status")
    return ResultPanel(label, info, gr.State(None), yes, no, claimed, status)


def wire_feedback(panel: ResultPanel, handlers, answered: list) -> None:
    """Feedback events of one panel; ``answered``: the model events that fill it (each resets its feedback)."""
    for event in answered:
        event.success(handlers.reset_feedback, inputs=[panel.state], outputs=[panel.claimed, panel.status],
                      queue=False, api_visibility="private")
    panel.yes.click(lambda s: handlers.feedback(s, correct=True), inputs=[panel.state], outputs=[panel.status],
                    api_visibility="private")
    panel.no.click(lambda s: handlers.feedback(s, correct=False), inputs=[panel.state], outputs=[panel.status],
                   api_visibility="private")
    # .input (not .change): only a person's choice counts, not our reset after a new prediction.
    panel.claimed.input(lambda s, c: handlers.feedback(s, correct=None, claimed=c) if c else gr.skip(),
                        inputs=[panel.state, panel.claimed], outputs=[panel.status], api_visibility="private")
