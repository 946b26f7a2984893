"""Humans in the loop: prediction log, review queue, decisions, export. The facade is review.service.ReviewService.

Modules: db (tables, engines), imagestore (content-addressed PNGs), scoring (pure queue scores), ingest + writer
(background logging), queue (claims), decisions (append-only log), stats (counts), auth (reviewer accounts),
export (fastai labels.csv), dataset + rescore (dataset audit, new-model rescoring), maintenance (reconcile,
purge), __main__ (CLI: python -m review ...).
"""
