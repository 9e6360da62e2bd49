import numpy as np
import pytest

from distill.core.calibration import (
    CalibrationError,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    shuffled,
    threshold_for_precision,
)


def test_ece_matches_hand_computation():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.3 (right; 3 classes)
    p = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.35, 0.35]])
    p[3] = [0.4, 0.3, 0.3]  # top-1 0.4, right
    y = np.array([0, 1, 0, 0])
    # bins of width 1/15: {0.9, 0.9} -> |0.5 - 0.9|; {0.6} -> |1 - 0.6|; {0.4} -> |1 - 0.4|
    expected = 2 / 4 * 0.4 + 1 / 4 * 0.4 + 1 / 4 * 0.6
    assert expected_calibration_error(p, y) == pytest.approx(expected)


def test_threshold_is_the_lowest_score_meeting_the_precision_by_hand():
    scores = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, True, True, False])
    # precision at each cut: 1, 1, 2/3, 3/4, 4/5, 4/6; target 0.75 -> cut at 0.7 (4/5), covering 4 of 5 positives
    th = threshold_for_precision(scores, correct, 0.75, n_positive=5)
    assert (th.threshold, th.precision, th.coverage, th.reached) == (0.7, pytest.approx(0.8), pytest.approx(0.8), True)
    assert threshold_for_precision(scores, correct, 1.0, 5).threshold == 0.95
    # tied scores cannot be split: a tie with a wrong call at the top reaches nothing
    none = threshold_for_precision(np.array([0.9, 0.9]), np.array([True, False]), 0.99, 2)
    assert not none.reached and none.threshold > 0.9 and none.coverage == 0.0


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 5)) * 3
    y = np.array([rng.choice(5, p=np.exp(z) / np.exp(z).sum()) for z in true_logits])
    assert fit_temperature(true_logits * 2.5, y) == pytest.approx(2.5, rel=0.1)  # logits made over-confident by 2.5


def test_calibrate_reports_ece_drop_and_a_threshold_that_rejects_negatives():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(1000, 4))
    true[np.arange(1000), rng.integers(0, 4, 1000)] += 5.0  # one class stands out
    y = np.array([rng.choice(4, p=np.exp(z) / np.exp(z).sum()) for z in true])  # labels drawn from the true probabilities
    logits = true * 3  # an over-confident head
    negatives = rng.normal(size=(500, 4)) * 3  # no class stands out
    c = calibrate(logits, y, negatives, 0.99)
    assert c["ece_after"] < c["ece_before"] / 2 and c["temperature"] == pytest.approx(3, rel=0.2)
    assert c["reached"] and c["precision"] >= 0.99 and 0.3 < c["coverage"] <= 1.0
    with pytest.raises(CalibrationError, match="no validation examples"):
        calibrate(logits[:0], y[:0], negatives, 0.99)
    with pytest.raises(CalibrationError, match="no negatives"):
        calibrate(logits, y, negatives[:0], 0.99)


def test_shuffled_keeps_composition_and_is_keyed():
    seqs = ["MKVLAAGGHW", "ACDEFGHIKLMNPQ"]
    a, b = shuffled(seqs, 0), shuffled(seqs, 0)
    assert a == b and a != seqs and [sorted(x) for x in a] == [sorted(x) for x in seqs]
    assert shuffled(seqs, 1) != a
