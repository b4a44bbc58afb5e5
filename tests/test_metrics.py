"""Metrics on hand-checked cases; temperature scaling undoes over-confidence."""
import numpy as np

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
