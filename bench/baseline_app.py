"""The usual way to put a fastai export online: a 15-line gr.Interface around learn.predict.

Baseline for bench/startup.py and bench/concurrency.py (not part of Loupe). Only /healthz is added, through
a FastAPI mount, so readiness is measured exactly as for Loupe. Env: BASELINE_MODEL_PATH, BASELINE_PORT.
"""

import os

import gradio as gr
import uvicorn
from fastai.vision.all import load_learner
from fastapi import FastAPI

learn = load_learner(os.environ["BASELINE_MODEL_PATH"])  # bench's own export / the pinned demo: trusted
labels = learn.dls.vocab


def classify(img):
    with learn.no_bar():
        _, _, probs = learn.predict(img)
    return {labels[i]: float(probs[i]) for i in range(len(labels))}


demo = gr.Interface(fn=classify, inputs=gr.Image(type="pil"), outputs=gr.Label(num_top_classes=5),
                    api_name="predict", flagging_mode="never", analytics_enabled=False)
app = FastAPI()


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


app = gr.mount_gradio_app(app, demo, path="/")
uvicorn.run(app, host="127.0.0.1", port=int(os.environ["BASELINE_PORT"]), log_level="warning")
