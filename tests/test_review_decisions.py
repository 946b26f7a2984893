import pytest
from sqlalchemy import func, select

from review.db import Decision
from review.types import ReviewError, UnknownItem
from tests import review_fixtures as rf
from tests.review_fixtures import probs, square, upload

services, sqlite_url, db_url = rf.services, rf.sqlite_url, rf.db_url  # fixtures


def queued(svc, n, **kw):
    for i in range(n):
        svc.log(**upload(square((10 * i, 50, 50), mark=i + 1)), probs=probs(0.5, 0.4, 0.1),
                           source="upload", latency_ms=1.0, **kw)
    svc.store.flush()


def n_decisions(svc) -> int:
    return svc.store.transaction(lambda s: s.scalar(select(func.count()).select_from(Decision)), read=True)


def test_double_submit_records_one_decision(services, db_url):
    svc = services(db_url)
    queued(svc, 1)
    item = svc.desk.next_item("alice")
    first = svc.desk.decide("alice", item.item_id, action="relabel", label="green", idempotency_key="key-1")
    again = svc.desk.decide("alice", item.item_id, action="relabel", label="green", idempotency_key="key-1")
    assert first.ok and again == first
    assert n_decisions(svc) == 1
    assert svc.desk.counts()["decisions"]["relabel"] == 1


def test_reusing_a_key_for_another_decision_is_refused(services, sqlite_url):
    svc = services(sqlite_url)
    queued(svc, 2)
    a = svc.desk.next_item("alice")
    svc.desk.decide("alice", a.item_id, action="confirm", label=None, idempotency_key="k")
    b = svc.desk.next_item("alice")
    with pytest.raises(ReviewError, match="idempotency key"):
        svc.desk.decide("alice", b.item_id, action="confirm", label=None, idempotency_key="k")


def test_conflict_is_reported_not_overwritten(services, db_url):
    svc = services(db_url)
    queued(svc, 1)
    item = svc.desk.next_item("alice")
    assert svc.desk.decide("alice", item.item_id, action="relabel", label="blue", idempotency_key="a").ok
    res = svc.desk.decide("bob", item.item_id, action="confirm", label=None, idempotency_key="b")
    assert res.status == "conflict" and res.decision_id is None
    assert [(c.reviewer, c.action, c.label) for c in res.conflicts] == [("alice", "relabel", "blue")]
    assert "alice" in res.message
    assert n_decisions(svc) == 1
    again = svc.desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key="a2")
    assert again.status == "conflict" and again.message.startswith("You")


def test_undo_appends_and_reopens(services, db_url):
    svc = services(db_url)
    queued(svc, 2)
    item = svc.desk.next_item("alice")
    svc.desk.decide("alice", item.item_id, action="relabel", label="blue", idempotency_key="a")
    res = svc.desk.undo("alice", idempotency_key="u")
    assert res.ok and res.action == "undo" and res.item_id == item.item_id
    assert (res.label, res.previous_label) == ("red", "blue")  # back to the model's label
    assert svc.desk.undo("alice", idempotency_key="u") == res  # a double click undoes once
    assert svc.desk.next_item("alice").item_id == item.item_id  # reopened and handed back
    assert svc.desk.next_item("bob").item_id != item.item_id
    rows = svc.store.transaction(lambda s: [(d.action, d.reverses_id) for d in s.scalars(
        select(Decision).order_by(Decision.id))], read=True)
    assert rows == [("relabel", None), ("undo", 1)]  # nothing edited or deleted
    assert svc.desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key="a3").ok
    counts = svc.desk.counts()
    assert counts["decisions"]["confirm"] == 1 and counts["decisions"]["relabel"] == 0 and counts["undos"] == 1
    assert svc.desk.undo("carol").status == "nothing_to_undo"


def test_undo_walks_back(services, sqlite_url):
    svc = services(sqlite_url)
    queued(svc, 2)
    ids = []
    for key in ("a", "b"):
        item = svc.desk.next_item("alice")
        ids.append(item.item_id)
        svc.desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key=key)
    assert svc.desk.undo("alice").item_id == ids[1]
    assert svc.desk.undo("alice").item_id == ids[0]
    assert svc.desk.undo("alice").status == "nothing_to_undo"
    assert svc.desk.counts()["queue_open"] == 2


def test_label_rules(services, sqlite_url):
    svc = services(sqlite_url)
    queued(svc, 1)
    item = svc.desk.next_item("alice")
    for action, label, msg in [("relabel", "purple", "not one of"), ("relabel", None, "not one of"),
                               ("confirm", "blue", "use relabel"), ("bad_image", "red", "takes no label"),
                               ("delete", None, "unknown action")]:
        with pytest.raises(ReviewError, match=msg):
            svc.desk.decide("alice", item.item_id, action=action, label=label, idempotency_key=f"{action}{label}")
    with pytest.raises(UnknownItem):
        svc.desk.decide("alice", 999, action="confirm", label=None, idempotency_key="z")
    with pytest.raises(ReviewError, match="reviewer"):
        svc.desk.next_item(" ")
    assert n_decisions(svc) == 0


def test_second_opinion(services, sqlite_url):
    svc = services(sqlite_url, second_opinion_rate=1.0)
    queued(svc, 2)
    a1 = svc.desk.next_item("alice")
    assert a1.required_decisions == 2
    svc.desk.decide("alice", a1.item_id, action="confirm", label=None, idempotency_key="a1")
    a2 = svc.desk.next_item("alice")
    assert a2.item_id != a1.item_id  # alice is never asked twice about one item
    svc.desk.decide("alice", a2.item_id, action="relabel", label="blue", idempotency_key="a2")
    assert svc.desk.next_item("alice") is None
    assert svc.desk.counts()["second_opinion"]["awaiting_second"] == 2
    b1 = svc.desk.next_item("bob")
    assert b1.item_id == a1.item_id and b1.decisions_so_far == 1
    svc.desk.decide("bob", b1.item_id, action="confirm", label=None, idempotency_key="b1")  # agrees
    b2 = svc.desk.next_item("bob")
    svc.desk.decide("bob", b2.item_id, action="confirm", label=None, idempotency_key="b2")  # disagrees
    late = svc.desk.decide("carol", b2.item_id, action="confirm", label=None, idempotency_key="c")
    assert late.status == "conflict" and {c.reviewer for c in late.conflicts} == {"alice", "bob"}
    so = svc.desk.counts()["second_opinion"]
    assert so == {"pairs": 2, "agreed": 1, "agreement": 0.5, "awaiting_second": 0}


# --- leases are checked by the data layer: a forged item id cannot decide someone else's item ---------------


def test_only_the_lease_holder_decides_a_claimed_item(services, db_url):
    svc = services(db_url)
    queued(svc, 2)
    a = svc.desk.next_item("alice")
    for action, label in [("confirm", None), ("relabel", "blue"), ("skip", None)]:
        with pytest.raises(ReviewError, match="Another reviewer is reviewing this item"):
            svc.desk.decide("bob", a.item_id, action=action, label=label, idempotency_key=f"forged-{action}")
    assert n_decisions(svc) == 0
    b = svc.desk.next_item("bob")
    assert b.item_id != a.item_id  # bob's refusals did not disturb alice's claim
    assert svc.desk.decide("alice", a.item_id, action="confirm", label=None, idempotency_key="a").ok
    assert svc.desk.decide("bob", b.item_id, action="relabel", label="blue", idempotency_key="b").ok


def test_a_lapsed_lease_protects_no_one(services, db_url):
    clock = rf.FakeClock()
    svc = services(db_url, clock=clock, claim_lease_s=60)
    queued(svc, 2)
    a = svc.desk.next_item("alice")
    clock.advance(seconds=61)
    # Alice's lease ran out while the item sat on her screen; nobody took it since: she may still decide it.
    assert svc.desk.decide("alice", a.item_id, action="confirm", label=None, idempotency_key="a").ok
    b = svc.desk.next_item("alice")
    clock.advance(seconds=61)
    assert svc.desk.next_item("bob").item_id == b.item_id  # the lapsed item is offered again, and bob claims it
    with pytest.raises(ReviewError, match="Another reviewer"):
        svc.desk.decide("alice", b.item_id, action="confirm", label=None, idempotency_key="late")
    assert svc.desk.decide("bob", b.item_id, action="confirm", label=None, idempotency_key="b").ok


def test_second_opinion_replay_and_undo_under_leases(services, db_url):
    svc = services(db_url, second_opinion_rate=1.0)
    queued(svc, 1)
    item = svc.desk.next_item("alice")
    first = svc.desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key="a")
    assert first.ok  # one of two decisions: the item stays open, alice's claim is released
    assert svc.desk.next_item("bob").item_id == item.item_id
    # A double press that arrives after bob claimed the item gets its first answer back, not a refusal.
    assert svc.desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key="a") == first
    with pytest.raises(ReviewError, match="Another reviewer"):
        svc.desk.decide("carol", item.item_id, action="relabel", label="blue", idempotency_key="c")
    # Alice undoes while bob holds the item: her decision is reversed, the item stays with bob.
    assert svc.desk.undo("alice", idempotency_key="u").ok
    with pytest.raises(ReviewError, match="Another reviewer"):
        svc.desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key="a2")
    assert svc.desk.decide("bob", item.item_id, action="confirm", label=None, idempotency_key="b").ok


def test_undo_hands_the_item_back_to_its_reviewer_only(services, db_url):
    svc = services(db_url)
    queued(svc, 2)
    item = svc.desk.next_item("alice")
    svc.desk.decide("alice", item.item_id, action="relabel", label="blue", idempotency_key="a")
    assert svc.desk.undo("alice", idempotency_key="u").ok
    with pytest.raises(ReviewError, match="Another reviewer"):
        svc.desk.decide("bob", item.item_id, action="confirm", label=None, idempotency_key="forged")
    assert svc.desk.decide("alice", item.item_id, action="confirm", label=None, idempotency_key="a2").ok
