"""Humans in the loop: prediction log, review queue, decisions, export.

Entry points: store.ReviewStore (engines, transactions, the background prediction log), desk.ReviewDesk (what a
reviewer does: claim, decide, undo, counts) and jobs (batch jobs: dataset import, re-scoring, export, reconcile,
purge). Underneath: db (tables, engines), imagestore (content-addressed images), scoring (pure queue scores),
ingest + writer (background logging), queue (claims), decisions (append-only log), stats (counts), auth (reviewer
accounts), export (fastai labels.csv), dataset + rescore (dataset audit, new-model re-scoring), maintenance
(reconcile, purge), __main__ (CLI: python -m review ...).
"""
