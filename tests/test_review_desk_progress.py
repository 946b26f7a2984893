"""The desk behind the reviewer's screen: "k of N left" per filter (ReviewDesk.progress), and how "the user is right"
is stored (a relabel to the claimed label: the decision log, second opinions and the export need nothing new)."""

from __future__ import annotations

import csv

from review import jobs
from tests import review_fixtures as rf
from tests.review_fixtures import probs, square, upload

services, sqlite_url, db_url = rf.services, rf.sqlite_url, rf.db_url  # fixtures


def log(svc, i: int, p, **kw) -> None:
    svc.log(**upload(square((10 * i, 50, 50), mark=i + 1)), probs=probs(*p), source="upload", latency_ms=1.0, **kw)


def test_progress_counts_what_is_left_for_this_reviewer(services, db_url):
    svc = services(db_url)
    for i in range(3):
        log(svc, i, (0.5, 0.4, 0.1))  # red, unsure
    for i in range(3, 5):
        log(svc, i, (0.4, 0.5, 0.1))  # green, unsure
    svc.store.flush()
    desk = svc.desk
    assert desk.progress("alice") == {"left": 5, "open": 5, "total": 5, "held": 0, "decided": 0}
    assert desk.progress("alice", predicted="green")["left"] == 2

    item = desk.next_item("alice", predicted="green")
    desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key="a1")
    held = desk.next_item("bob")  # bob holds one item now
    skipped = desk.next_item("alice")
    assert skipped.item_id != held.item_id
    desk.decide("alice", skipped.item_id, action="skip", label=None, idempotency_key="a2")

    assert desk.progress("alice") == {"left": 3, "open": 4, "total": 5, "held": 1, "decided": 1}
    green = desk.progress("alice", predicted="green")
    assert green["total"] == 2 and green["left"] == 1
    assert desk.progress("bob") == {"left": 4, "open": 4, "total": 5, "held": 0, "decided": 0}

    desk.undo("alice", idempotency_key="u1")  # undoing the skip: the item is left for alice again
    assert desk.progress("alice")["left"] == 4
    desk.undo("alice", idempotency_key="u2")  # ...and the confirm
    assert desk.progress("alice")["decided"] == 0 and desk.progress("alice")["open"] == 5


def test_the_user_is_right_is_a_relabel_to_the_claimed_label(services, sqlite_url, tmp_path):
    """The UI's "the user is right" records what this test records; the export then carries the user's label."""
    svc = services(sqlite_url)
    log(svc, 0, (0.2, 0.7, 0.1), claimed_label="red")  # the model says green, a user said red
    log(svc, 1, (0.2, 0.7, 0.1), claimed_label="red")
    svc.store.flush()
    desk = svc.desk
    first = desk.next_item("alice")
    assert (first.predicted, first.claimed_labels) == ("green", ("red",))
    user = desk.decide("alice", first.item_id, action="relabel", label="red", idempotency_key="k1")
    second = desk.next_item("alice")
    model = desk.decide("alice", second.item_id, action="confirm", label=None, idempotency_key="k2")
    assert (user.action, user.label, user.previous_label) == ("relabel", "red", "red")
    assert (model.action, model.label, model.previous_label) == ("confirm", "green", "red")

    report = jobs.export_reviewed(svc.store, tmp_path / "out")
    with open(report.out_dir / "labels.csv", newline="") as f:
        labels = {row["fname"].split("/")[-1].removesuffix(".png"): row["label"] for row in csv.DictReader(f)}
    assert labels == {first.image_sha256: "red", second.image_sha256: "green"}
