"""Training under acquisition shifts (``FitConfig.acquisition``): the run validates on a fixed shifted copy of
its neutral validation set, and ``val_robust_loss`` (the mean of the neutral and shifted losses) can choose
its epoch, so that a shift-trained run is not chosen by a loss that cannot see the shifts."""
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from train.fit import FitConfig, fit
from train.shifts import shifted_copies

MINI = Path(__file__).parent / "data" / "chest_xray"


def test_shifted_copies_are_seeded_and_shift_the_images():
    rng = np.random.default_rng(3)
    x = (rng.random((6, 48, 48)) * 40 + np.linspace(60, 200, 48)[None, None, :]).astype(np.uint8)
    a, b = shifted_copies(x, 0), shifted_copies(x, 0)
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert sum(not np.array_equal(ai, xi) for ai, xi in zip(a, x)) >= 5
    assert not np.array_equal(shifted_copies(x, 1), a)


def test_a_fit_under_shifts_validates_on_shifted_copies_and_chooses_its_epoch_by_both(tmp_path, monkeypatch):
    monkeypatch.setattr("train.fit.RUNS_DIR", tmp_path / "runs")
    cfg = FitConfig(model="baseline", input_size=32, epochs=3, batch=2, val_fraction=0.5, optimizer="adam",
                    augment=False, framing=0.7, acquisition=0.5, monitor="val_robust_loss", name="acq")
    run = fit(cfg, MINI)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_shifted"]["n"] == metrics["val_neutral"]["n"] == 2 * metrics["val"]["n"]
    history = list(csv.DictReader((run / "history.csv").open()))
    robust = [float(r["val_robust_loss"]) for r in history]
    for r, v in zip(history, robust):
        assert v == pytest.approx((float(r["val_neutral_loss"]) + float(r["val_shifted_loss"])) / 2)
    assert metrics["best_epoch"] == 1 + int(np.argmin(robust))
    with pytest.raises(ValueError, match="needs acquisition shifts"):
        fit(dataclasses.replace(cfg, acquisition=0.0), MINI)
