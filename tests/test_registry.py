"""Model selection: the registry ranks runs by their validation metric, best first, and a leaky
``--protocol seed`` run never competes, whatever its numbers; the export command exports that choice.
Fake run folders (config.json + metrics.json + a weights file) are enough: nothing is trained."""
import json
from pathlib import Path

import pytest

from train.registry import best_run, list_runs

# name: (model, config protocol, metrics protocol, val accuracy, val macro-F1, has weights, extra metrics)
RUNS = {
    "r1-ok": ("baseline", "grouped", "grouped", 0.80, 0.70, True, {}),
    "r2-tie": ("efficientnet_lite0", "grouped", "grouped", 0.85, 0.75, True, {}),
    "r3-best": ("efficientnet_lite0", "grouped", "grouped", 0.85, 0.80, True, {}),
    "r4-leaky": ("efficientnet_lite0", "seed", "seed", 0.99, 0.99, True, {"seed_test": {"accuracy": 0.99}}),
    "r5-mixed": ("efficientnet_lite0", "seed", "grouped", 0.98, 0.98, True, {}),
    "r6-noweights": ("efficientnet_lite0", "grouped", "grouped", 0.97, 0.97, False, {}),
    # a run whose official-test number is great but whose validation is poor: validation decides
    "r7-testgood": ("baseline", "grouped", "grouped", 0.70, 0.65, True, {"official_test": {"accuracy": 0.99}}),
}
ORDER = ["r3-best", "r2-tie", "r1-ok", "r7-testgood"]


@pytest.fixture
def runs(tmp_path) -> Path:
    for name, (model, cfg_proto, met_proto, acc, f1, weights, extra) in RUNS.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model": model, "input_size": 64, "protocol": cfg_proto}))
        (d / "metrics.json").write_text(json.dumps({
            "run_id": name, "model": model, "protocol": met_proto, "pretrained": "none",
            "val": {"accuracy": acc, "macro_f1": f1}, **extra}))
        if weights:
            (d / ("weights.part0.npz" if name == "r2-tie" else "weights.npz")).write_bytes(b"")
    return tmp_path


def test_ranked_by_validation_best_first_without_leaky_runs(runs):
    assert [r["run_id"] for r in list_runs(runs)] == ORDER
    assert best_run(runs_dir=runs)["run_id"] == "r3-best"
    assert best_run("baseline", runs_dir=runs)["run_id"] == "r1-ok"
    assert all(r["protocol"] == "grouped" for r in list_runs(runs))


def test_seed_runs_are_listed_only_when_asked_and_never_chosen(runs):
    everything = [r["run_id"] for r in list_runs(runs, protocol=None)]
    assert everything[0] == "r4-leaky" and "r5-mixed" in everything  # display only
    assert [r["run_id"] for r in list_runs(runs, protocol="seed")] == ["r4-leaky"]
    with pytest.raises(LookupError):
        best_run("densenet201", runs_dir=runs)


def test_export_without_run_exports_the_registry_choice(runs, monkeypatch):
    from export import convert

    monkeypatch.setattr("train.registry.RUNS_DIR", runs)
    run_dir, metrics = convert._resolve_run(None)
    assert run_dir == runs / "r3-best" and metrics["val"]["accuracy"] == 0.85
