"""Metrics on hand-checked cases; temperature scaling undoes over-confidence."""
import numpy as np
import pytest

from train.metrics import (apply_temperature, bootstrap_ci, calibration_bins, classification_metrics,
                           fit_temperature)


def test_metrics_on_a_hand_checked_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.1, .7, .2], [.1, .2, .7], [.6, .2, .2]])
    m = classification_metrics(y, p)
    assert m["accuracy"] == 4 / 6
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["recall"] == {"normal": 0.5, "bacterial": 1.0, "viral": 0.5}
    # normal vs pneumonia: predictions N, B, B, B, V, N against N, N, P, P, P, P
    assert m["binary"]["sensitivity"] == 3 / 4 and m["binary"]["specificity"] == 1 / 2


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = np.full((300, 3), 0.1)
    p[np.arange(300), np.where(rng.random(300) < 0.8, y, (y + 1) % 3)] = 0.8
    ci = bootstrap_ci(y, p, n=300)
    acc = classification_metrics(y, p)["accuracy"]
    assert ci["accuracy"][0] < acc < ci["accuracy"][1]
    assert ci["accuracy"][1] - ci["accuracy"][0] < 0.15


def test_temperature_scaling_fixes_over_confidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    logits = rng.normal(0, 1, (3000, 3))
    logits[np.arange(3000), y] += 1.5
    p = np.exp(3 * logits)
    p /= p.sum(1, keepdims=True)
    t = fit_temperature(y, p)
    assert 2.0 < t < 4.0
    assert calibration_bins(y, apply_temperature(p, t))["ece"] < calibration_bins(y, p)["ece"] / 2
    np.testing.assert_array_equal(apply_temperature(p, t).argmax(1), p.argmax(1))


def test_temperature_and_its_record_match_hand_computed_values():
    """Eight scans, all given [0.9, 0.05, 0.05]; six are class 0, one each class 1 and 2. The likelihood
    is best when the calibrated class-0 probability equals 6/8 = 0.75, i.e. 1 / (1 + 2 r^(1/T)) = 0.75
    with r = 0.05 / 0.9, so T = ln(r) / ln(1/6) = 1.6131... By hand: ECE 0.15 before (confidence 0.9,
    accuracy 0.75), 0 after; log loss -(6 ln 0.9 + 2 ln 0.05) / 8 = 0.82795 before, -(6 ln 0.75 + 2 ln 0.125)
    / 8 = 0.73562 after."""
    from export.calibrate import temperature_record

    y = np.array([0, 0, 0, 0, 0, 0, 1, 2])
    p = np.tile([0.9, 0.05, 0.05], (8, 1))
    t = np.log(0.05 / 0.9) / np.log(1 / 6)
    assert abs(t - 1.6131) < 1e-4
    rec = temperature_record(y, p, "tflite", fitted_on="validation split of r")
    assert rec["temperature"] == pytest.approx(t, abs=1e-3) and fit_temperature(y, p) == rec["temperature"]
    assert rec["n"] == 8 and rec["fitted_on"] == "validation split of r"
    assert rec["val_ece"]["before"] == pytest.approx(0.15) and rec["val_ece"]["after"] == pytest.approx(0, abs=1e-3)
    assert rec["val_log_loss"]["before"] == pytest.approx(0.82795, abs=1e-5)
    assert rec["val_log_loss"]["after"] == pytest.approx(0.73562, abs=1e-4)
    # softmax(log p / T) by hand for one row
    q = np.array([0.9, 0.05, 0.05]) ** (1 / 2.0)
    np.testing.assert_allclose(apply_temperature(p[:1], 2.0)[0], q / q.sum(), rtol=1e-6)
    np.testing.assert_allclose(apply_temperature(p[:1], t)[0], [0.75, 0.125, 0.125], atol=1e-6)
