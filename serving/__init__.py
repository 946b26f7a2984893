"""The request path, independent of Gradio and FastAPI: untrusted bytes in, an answer (and a log record) out.

Modules: imageio (decoding untrusted images), gate (admission control for callers outside Gradio's queue),
router (which model version answers, atomically swappable), pipeline (the one prediction path every front end
and the dataset audit use), shadow (a shadow candidate's scoring, off the request path), follower (keeps the router
on the versions the model registry names, in every replica).
"""
