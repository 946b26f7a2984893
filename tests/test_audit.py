"""Out-of-fold dataset audit: label-quality scores (hand-checked), folds, queueing, idempotency, the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from review import scoring
from review.types import DATASET, HIGH_LOSS

# labels and probabilities worked through by hand below
Y = [0, 1, 2, 0]
P = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])


def test_self_confidence_and_normalized_margin_by_hand():
    np.testing.assert_allclose(scoring.self_confidence(Y, P), [0.7, 0.6, 0.1, 0.2])
    # (p[label] - best other + 1) / 2: (0.7-0.2+1)/2, (0.6-0.3+1)/2, (0.1-0.5+1)/2, (0.2-0.7+1)/2
    np.testing.assert_allclose(scoring.normalized_margin(Y, P), [0.75, 0.65, 0.3, 0.25])


def test_confident_thresholds_and_issues_by_hand():
    # class 0: items 0 and 3 -> (0.7 + 0.2) / 2; class 1: item 1 -> 0.6; class 2: item 2 -> 0.1
    np.testing.assert_allclose(scoring.confident_thresholds(Y, P), [0.45, 0.6, 0.1])
    # item 0: confident in 0 and 2 -> the more probable, 0 = its label; item 1: 1 and 2 -> 1 = its label;
    # item 2: 0 and 2 -> 0, labelled 2: an issue; item 3: 1 and 2 -> 1, labelled 0: an issue
    np.testing.assert_array_equal(scoring.confident_guess(Y, P), [0, 1, 0, 1])
    np.testing.assert_array_equal(scoring.likely_label_issues(Y, P), [False, False, True, True])


def test_one_confident_class_wins_over_the_argmax_and_missing_classes_never_count():
    # thresholds 0.6 / 0.4 / inf: p = (0.5, 0.45, 0.05) labelled 1 is confident in class 1 only (0.5 < 0.6),
    # so it is no issue although the model's top class is 0; nothing is confident -> guess -1, no issue.
    p = np.array([[0.5, 0.45, 0.05], [0.3, 0.3, 0.4]])
    t = [0.6, 0.4, math.inf]
    np.testing.assert_array_equal(scoring.confident_guess([1, 0], p, t), [1, -1])
    assert not scoring.likely_label_issues([1, 0], p, t).any()
    # a class nobody is labelled with gets an infinite threshold (cleanlab's rule)
    assert scoring.confident_thresholds([0, 0], p)[2] == math.inf


def test_adjusted_self_confidence_by_hand():
    # item 0: p - t = (0.25, -0.4, 0.0); shifted by 0.4 -> (0.65, 0, 0.4), sum 1.05 -> 0.65 / 1.05
    # item 2: p - t = (0.05, -0.2, 0.0); shifted by 0.2 -> (0.25, 0, 0.2), sum 0.45 -> 0.2 / 0.45
    adj = scoring.adjusted_self_confidence(Y, P)
    assert adj[0] == pytest.approx(0.65 / 1.05) and adj[2] == pytest.approx(0.2 / 0.45)


def test_label_quality_dispatch_and_errors():
    for method in scoring.LABEL_QUALITY_METHODS:
        q = scoring.label_quality(Y, P, method)
        assert q.shape == (4,) and ((q >= 0) & (q <= 1)).all()
    with pytest.raises(ValueError, match="unknown label quality"):
        scoring.label_quality(Y, P, "entropy")
    with pytest.raises(ValueError, match="range"):
        scoring.self_confidence([3, 0, 0, 0], P)
    with pytest.raises(ValueError, match="shape"):
        scoring.self_confidence([0, 1], P)


def test_label_issue_priority_is_the_dataset_tier_ordered_by_quality():
    q = np.array([0.9, 0.05, 0.5, 1.0])
    prio = scoring.label_issue_priority(q)
    assert ((prio >= 3) & (prio < 4)).all()
    assert list(np.argsort(-prio)) == [1, 2, 0, 3]
    # read as a loss: an audit item with self-confidence exp(-2) ranks exactly like a high-loss item of loss 2
    high_loss = scoring.queue_priority([HIGH_LOSS], [0.9], [0.8], [2.0])
    assert scoring.label_issue_priority([math.exp(-2.0)])[0] == pytest.approx(high_loss[0])
    assert scoring.queue_priority([DATASET], [0.5], [0.1], [-math.log(0.5)])[0] == pytest.approx(prio[2])
