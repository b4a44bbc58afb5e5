"""Weight averaging (``train.soup``): the averaged run holds the line between two runs' weights, rebuilds
as a run (``train.registry.load_run``) and is scored on the same validation split; runs that cannot be
averaged are refused."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from train import soup
from train.fit import FitConfig, fit
from train.models import load_named

MINI = Path(__file__).parent / "data" / "chest_xray"


def test_average_is_the_line_between_the_weights():
    a = {"w": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)}
    b = {"w": np.full((2, 2), 4.0, np.float32), "b": np.full(3, 3.0, np.float32)}
    m = soup.average(a, b, 0.25)
    assert np.allclose(m["w"], 1.0) and np.allclose(m["b"], 1.5)
    assert soup.average(a, b, 0.0)["w"].max() == 0 and soup.average(a, b, 1.0)["w"].min() == 4
    with pytest.raises(ValueError, match="alpha"):
        soup.average(a, b, 1.5)
    with pytest.raises(ValueError, match="different variables"):
        soup.average(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        soup.average(a, {**b, "b": np.ones(4, np.float32)}, 0.5)


def test_a_soup_of_two_tiny_runs_is_a_run_scored_on_their_split(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("train.fit.RUNS_DIR", tmp_path / "runs")
    cfg = FitConfig(model="baseline", input_size=32, epochs=1, batch=2, val_fraction=0.5, optimizer="adam",
                    augment=False, name="a")
    run_a = fit(cfg, MINI)
    run_b = fit(dataclasses.replace(cfg, seed=1, lr=3e-3, name="b"), MINI)
    assert soup.main([str(run_a), str(run_b), "--alpha", "0.5", "1", "--data", str(MINI)]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert [d["alpha"] for d in lines] == [0.5, 1.0]
    half, whole = (Path(d["run"]) for d in lines)
    wa, wb, wh = (load_named(r / "weights.npz") for r in (run_a, run_b, half))
    assert all(np.allclose(wh[k], (wa[k] + wb[k]) / 2, atol=1e-6) for k in wa)
    # alpha 1 is run b itself: the same validation images, the same answers
    mb, mw = (json.loads((r / "metrics.json").read_text())["val"] for r in (run_b, whole))
    assert mw["n"] == mb["n"] and mw["confusion"] == mb["confusion"]
    assert abs(mw["log_loss"] - mb["log_loss"]) < 1e-4
    assert json.loads((half / "config.json").read_text())["extra"]["soup"]["b"] == run_b.name
    other = fit(dataclasses.replace(cfg, input_size=40, name="c"), MINI)
    with pytest.raises(ValueError, match="input_size"):
        soup.soup(run_a, other, [0.5], MINI)
