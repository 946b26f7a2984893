import io
import math

import pytest
from PIL import Image

from review.types import ReviewError, UnknownPrediction
from tests import review_fixtures as rf
from tests.review_fixtures import MODEL, FakeClock, probs, square, upload

services, sqlite_url = rf.services, rf.sqlite_url  # fixtures

RED, GREEN, BLUE = (200, 0, 0), (0, 200, 0), (0, 0, 200)


def log(svc, img, p, **kw):
    return svc.log(**upload(img), probs=p, source="upload", latency_ms=3.0, **kw)


def drain(svc, reviewer="alice", **filters):
    """Review everything the reviewer is offered (confirm); returns the items in the order offered."""
    seen = []
    while (item := svc.desk.next_item(reviewer, **filters)) is not None:
        seen.append(item)
        assert svc.desk.decide(reviewer, item.item_id, action="confirm", label=None,
                          idempotency_key=f"{reviewer}-{item.item_id}").ok
    return seen


def test_queue_order_and_reasons(services, sqlite_url):
    svc = services(sqlite_url)
    log(svc, square(RED, mark=1), probs(0.45, 0.43, 0.12))  # low confidence, margin 0.02
    log(svc, square(RED, mark=2), probs(0.55, 0.25, 0.20))  # low confidence, margin 0.30
    log(svc, square(RED, mark=3), probs(0.95, 0.03, 0.02))  # confident: not queued
    log(svc, square(RED, mark=4), probs(0.90, 0.05, 0.05), claimed_label="blue")  # loss 3.0
    svc.store.flush()
    items = drain(svc)
    assert [i.reasons for i in items] == [("high_loss",), ("low_confidence",), ("low_confidence",)]
    assert [round(i.margin, 2) for i in items] == [0.85, 0.02, 0.30]
    first = items[0]
    assert first.claimed_labels == ("blue",) and first.loss == pytest.approx(-math.log(0.05), abs=1e-4)
    assert list(first.probs) == ["red", "green", "blue"] and first.predicted == "red"
    assert first.vocab == MODEL.vocab and first.model_version == MODEL.version
    assert svc.desk.counts()["predictions"] == 4


def test_audit_sample_is_queued_whatever_the_confidence(services, sqlite_url):
    svc = services(sqlite_url, audit_rate=1.0)
    log(svc, square(RED, mark=1), probs(0.99, 0.005, 0.005))
    log(svc, square(RED, mark=2), probs(0.45, 0.43, 0.12))
    svc.store.flush()
    items = drain(svc)
    assert [i.reasons for i in items] == [("audit",), ("audit", "low_confidence")]  # audit tier: oldest first
    svc.desk.decide("bob", items[0].item_id, action="confirm", label=None, idempotency_key="x")  # conflict, ignored
    assert svc.desk.counts()["audit"] == {"reviewed": 2, "correct": 2, "accuracy": 1.0}


def test_exact_duplicates_are_reviewed_once(services, sqlite_url):
    svc = services(sqlite_url)
    img = square(GREEN, mark=5)
    log(svc, img, probs(0.5, 0.45, 0.05))
    log(svc, img.copy(), probs(0.5, 0.45, 0.05), claimed_label="blue")  # same pixels, now with a claim
    svc.store.flush()
    counts = svc.desk.counts()
    assert counts["queue_open"] == 1 and counts["predictions"] == 2
    item = svc.desk.next_item("alice")
    assert set(item.reasons) == {"high_loss", "low_confidence"} and item.seen == 2
    assert item.claimed_labels == ("blue",)
    svc.desk.decide("alice", item.item_id, action="relabel", label="blue", idempotency_key="k")
    log(svc, img.copy(), probs(0.4, 0.35, 0.25))  # seen again after the decision: stays decided
    svc.store.flush()
    assert svc.desk.next_item("bob") is None
    assert svc.desk.counts()["queue_done"] == 1


def test_filters(services, sqlite_url):
    svc = services(sqlite_url)
    log(svc, square(RED, mark=1), probs(0.5, 0.4, 0.1))
    log(svc, square(RED, mark=2), probs(0.1, 0.5, 0.4))
    log(svc, square(RED, mark=3), probs(0.9, 0.05, 0.05), claimed_label="green")
    svc.store.flush()
    assert [i.predicted for i in drain(svc, "alice", predicted="green")] == ["green"]
    assert [i.reasons for i in drain(svc, "alice", reason="high_loss")] == [("high_loss",)]
    assert drain(svc, "alice", model_version="other@1") == []
    assert len(drain(svc, "alice", model_version=MODEL.version)) == 1
    with pytest.raises(ReviewError, match="unknown reason"):
        svc.desk.next_item("alice", reason="nope")


def test_claim_is_held_renewed_and_leases_expire(services, sqlite_url):
    clock = FakeClock()
    svc = services(sqlite_url, clock=clock, claim_lease_s=60)
    log(svc, square(RED, mark=1), probs(0.5, 0.4, 0.1))
    svc.store.flush()
    a = svc.desk.next_item("alice")
    assert svc.desk.next_item("alice").item_id == a.item_id  # asking again returns the held item
    assert svc.desk.next_item("bob") is None  # claimed by alice
    clock.advance(seconds=59)
    assert svc.desk.next_item("bob") is None
    clock.advance(seconds=2)  # alice's lease ran out
    b = svc.desk.next_item("bob")
    assert b.item_id == a.item_id
    assert svc.desk.decide("bob", b.item_id, action="confirm", label=None, idempotency_key="b").ok
    late = svc.desk.decide("alice", a.item_id, action="relabel", label="blue", idempotency_key="a")
    assert late.status == "conflict" and late.conflicts[0].reviewer == "bob"


def test_changing_filters_releases_the_held_claim(services, sqlite_url):
    svc = services(sqlite_url)
    log(svc, square(RED, mark=1), probs(0.5, 0.4, 0.1))
    log(svc, square(RED, mark=2), probs(0.1, 0.5, 0.4))
    svc.store.flush()
    red = svc.desk.next_item("alice", predicted="red")
    green = svc.desk.next_item("alice", predicted="green")
    assert red.predicted == "red" and green.predicted == "green"
    assert svc.desk.next_item("bob").item_id == red.item_id  # released when alice switched filters
    assert svc.desk.release("alice") == 1


def test_skip_releases_and_hides_from_the_skipper(services, sqlite_url):
    svc = services(sqlite_url)
    log(svc, square(RED, mark=1), probs(0.5, 0.4, 0.1))
    svc.store.flush()
    item = svc.desk.next_item("alice")
    assert svc.desk.decide("alice", item.item_id, action="skip", label=None, idempotency_key="s").ok
    assert svc.desk.next_item("alice") is None
    assert svc.desk.next_item("bob").item_id == item.item_id
    assert svc.desk.undo("alice").action == "undo"  # undoing the skip never takes the item from bob's live claim
    assert svc.desk.next_item("alice") is None
    svc.desk.release("bob")
    assert svc.desk.next_item("alice").item_id == item.item_id  # but alice may see it again
    assert svc.desk.counts()["decisions"]["skip"] == 0  # the reversed skip no longer counts


def test_feedback(services, sqlite_url):
    svc = services(sqlite_url)
    wrong = log(svc, square(BLUE, mark=1), probs(0.97, 0.02, 0.01))  # pending: not written yet, still accepted
    svc.store.record_feedback(wrong, correct=False, claimed_label=None)
    claimed = log(svc, square(BLUE, mark=2), probs(0.97, 0.02, 0.01))
    svc.store.record_feedback(claimed, correct=False, claimed_label="blue")
    fine = log(svc, square(BLUE, mark=3), probs(0.97, 0.02, 0.01))
    svc.store.flush()
    svc.store.record_feedback(fine, correct=True, claimed_label=None)
    svc.store.flush()
    items = drain(svc)
    assert [i.reasons for i in items] == [("high_loss",), ("user_flagged",)]  # loss 4.6 > bound 3.5
    assert items[0].loss == pytest.approx(4.6, abs=0.01)
    with pytest.raises(UnknownPrediction):
        svc.store.record_feedback("0" * 32, correct=True, claimed_label=None)
    with pytest.raises(ReviewError, match="not one of"):
        svc.store.record_feedback(fine, correct=False, claimed_label="purple")
    with pytest.raises(ReviewError, match="nothing to record"):
        svc.store.record_feedback(fine, correct=None, claimed_label=None)


def test_log_prediction_validates(services, sqlite_url):
    svc = services(sqlite_url)
    with pytest.raises(ReviewError, match="classes"):
        log(svc, square(RED), probs(0.5, 0.5))
    with pytest.raises(ReviewError, match="source"):
        svc.log(**upload(square(RED)), probs=probs(1, 1, 1), source="fax", latency_ms=1)
    with pytest.raises(ReviewError, match="not one of"):
        log(svc, square(RED), probs(1, 1, 1), claimed_label="purple")


def test_stored_image_is_the_pixels_only(services, sqlite_url):
    svc = services(sqlite_url)
    img = square(RED, size=20, mark=7)
    img.info["comment"] = b"secret"  # metadata must not survive storage
    log(svc, img, probs(0.5, 0.4, 0.1))
    svc.store.flush()
    item = svc.desk.next_item("alice")
    data = svc.desk.image_bytes(item.image_sha256)
    with Image.open(io.BytesIO(data)) as back:
        assert back.format == "PNG" and back.tobytes() == img.tobytes() and "comment" not in back.info
    assert b"secret" not in data
    for bad in ("../../etc/passwd", "A" * 64, item.image_sha256[:-1]):
        with pytest.raises(ReviewError, match="image id"):
            svc.desk.image_bytes(bad)


def test_storing_uploads_can_be_switched_off(services, sqlite_url):
    svc = services(sqlite_url, store_uploads=False)
    log(svc, square(RED, mark=1), probs(0.5, 0.4, 0.1))
    svc.store.flush()
    counts = svc.desk.counts()
    assert counts["predictions"] == 1 and counts["queue_open"] == 0
    assert list(svc.store.images.iter_shas()) == []
