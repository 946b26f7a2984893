import math
import uuid

import numpy as np
import pytest

from review import scoring
from review.types import AUDIT, DATASET, HIGH_LOSS, LOW_CONFIDENCE, USER_FLAGGED

P = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])


def test_confidence_margin_entropy_by_hand():
    np.testing.assert_allclose(scoring.confidence(P), [0.7, 0.5, 1.0])
    np.testing.assert_allclose(scoring.margin(P), [0.5, 0.0, 1.0])
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    np.testing.assert_allclose(scoring.entropy(P), [expected, math.log(2), 0.0], atol=1e-12)


def test_margin_with_one_class_is_the_probability():
    np.testing.assert_allclose(scoring.margin([[0.8]]), [0.8])


def test_loss_is_cross_entropy_and_nan_for_unknown_labels():
    out = scoring.loss([0, 2, -1], P)
    assert out[0] == pytest.approx(-math.log(0.7))
    assert out[1] == pytest.approx(-math.log(1e-12))  # p = 0 is clipped, not infinite
    assert math.isnan(out[2])


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((2, 0))])
def test_bad_shapes_are_refused(bad):
    with pytest.raises(ValueError, match="shape"):
        scoring.confidence(bad)


def test_loss_refuses_out_of_range_labels():
    with pytest.raises(ValueError, match="range"):
        scoring.loss([3, 0, 0], P)


def _reasons(conf, marg, loss, audit=(False,), **kw):
    th = {"low_confidence": 0.6, "low_margin": 0.2, "high_loss": 1.0}
    return scoring.review_reasons(conf, marg, loss, audit, **th, **kw)


def test_review_reasons_thresholds():
    conf = [0.55, 0.9, 0.9, 0.9, 0.9]
    marg = [0.5, 0.1, 0.8, 0.8, 0.8]
    loss = [np.nan, np.nan, 2.0, 0.5, np.nan]
    audit = [False, False, False, False, True]
    r = _reasons(conf, marg, loss, audit)
    assert list(r) == [LOW_CONFIDENCE, LOW_CONFIDENCE, HIGH_LOSS, 0, AUDIT]


def test_dataset_rows_only_get_the_dataset_reason():
    r = _reasons([0.3, 0.3], [0.0, 0.0], [2.0, 0.1], [True, True], dataset=[True, True])
    assert list(r) == [DATASET, 0]


def test_flagged_reason():
    assert list(_reasons([0.99], [0.98], [np.nan], flagged=[True])) == [USER_FLAGGED]


def test_queue_priority_order():
    rows = {  # name: (reasons, confidence, margin, loss)
        "loss 3": (HIGH_LOSS, 0.9, 0.8, 3.0),
        "flagged at 0.97 (bound 3.5)": (USER_FLAGGED, 0.97, 0.95, np.nan),
        "loss 1.5 + low conf": (HIGH_LOSS | LOW_CONFIDENCE, 0.5, 0.1, 1.5),
        "dataset 1.2": (DATASET, 0.7, 0.5, 1.2),
        "audit + low conf": (AUDIT | LOW_CONFIDENCE, 0.5, 0.05, np.nan),
        "audit": (AUDIT, 0.99, 0.98, np.nan),
        "low conf margin 0.01": (LOW_CONFIDENCE, 0.5, 0.01, np.nan),
        "low conf margin 0.15": (LOW_CONFIDENCE, 0.55, 0.15, np.nan),
        "none": (0, 0.99, 0.98, np.nan),
    }
    names = list(rows)
    cols = list(zip(*rows.values(), strict=True))
    prio = scoring.queue_priority(*cols)
    ranked = [names[i] for i in np.argsort(-prio, kind="stable")]
    assert ranked == ["flagged at 0.97 (bound 3.5)", "loss 3", "loss 1.5 + low conf", "dataset 1.2",
                      "audit + low conf", "audit", "low conf margin 0.01", "low conf margin 0.15", "none"]
    assert prio[names.index("none")] == 0
    assert (prio[:-1] > 0).all() and (prio < 4).all()


def test_audit_sample_is_uniform_deterministic_and_ignores_confidence():
    ids = [uuid.UUID(int=i, version=4).hex for i in range(10_000)]
    picked = scoring.is_audit(ids, 0.02)
    assert 150 <= picked.sum() <= 250  # 2% of 10,000 = 200, binomial sd ~ 14
    assert (scoring.is_audit(ids, 0.02) == picked).all()  # replicas and reruns agree
    assert scoring.is_audit(ids, 0.0).sum() == 0 and scoring.is_audit(ids, 1.0).all()
    # the sample is about the ids only, so it cannot be biased towards (un)confident predictions
    reasons = scoring.review_reasons(np.ones(10_000), np.ones(10_000), np.full(10_000, np.nan), picked,
                                     low_confidence=0.6, low_margin=0.2, high_loss=1.0)
    assert ((reasons & AUDIT) != 0).sum() == picked.sum()


def test_second_opinion_share():
    shas = [f"{i:064x}" for i in range(5000)]
    share = scoring.needs_second_opinion(shas, 0.1).mean()
    assert 0.08 < share < 0.12
