"""The export command's path (``python -m export.convert``, ``main``) on a run folder holding the tiny model, with
validation and test splits that disagree on purpose, to show that only validation decides: the int8 retry ladder,
the gate, the temperature and the installation of the default bundle (refused when it is too large)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _export_common import CAM_MAX_TOL, CAM_MEAN_TOL
from cxr_edge.bundle import load_bundle
from cxr_edge.engines import open_engine


@pytest.fixture(scope="module")
def tiny_run(tiny_export, tmp_path_factory) -> Path:
    """A run folder as ``train.fit`` writes it (config.json + weights.npz, no metrics.json: as a run
    brought back from a GPU lease may be), holding the tiny model's weights; its architecture is
    registered as ``tiny_cam`` in ``train.models.REGISTRY`` by the ``tiny_cam_registered`` fixture."""
    from train.models import named_weights, save_named

    run = tmp_path_factory.mktemp("runs") / "20260101-000000-tiny"
    run.mkdir()
    cfg = {"model": "tiny_cam", "input_size": tiny_export.spec.size, "dropout": 0.2,
           "protocol": "grouped", "val_fraction": 0.5, "seed": 0, "weights": None}
    (run / "config.json").write_text(json.dumps(cfg))
    save_named(named_weights(tiny_export.model), str(run / "weights.npz"))
    return run


@pytest.fixture
def tiny_cam_registered(tiny_export, monkeypatch):
    from conftest import tiny_cam_model
    from train import models

    monkeypatch.setitem(models.REGISTRY, "tiny_cam", lambda input_size, **_: models.Built(
        tiny_cam_model(input_size), tiny_export.spec, "none"))


def _cli(run: Path, out: Path, *extra: str) -> int:
    from export.convert import main

    data = Path(__file__).resolve().parent / "data" / "chest_xray"
    return main(["--run", str(run), "--out", str(out), "--data", str(data), "--calibration", "6",
                 "--threads", "1", *extra])


class SplitSpy:
    """Wraps ``run_data`` and ``parity.predict`` of the export command: remembers the data it decoded and
    makes the int8 artifacts' predictions on one split (``corrupt``) wrong, so that validation and the
    official test set disagree on purpose."""

    def __init__(self, monkeypatch, corrupt: str):
        from export import convert, parity

        self.data, self.corrupt = None, corrupt
        real_data, real_predict = convert.run_data, parity.predict

        def run_data(*args, **kwargs):
            self.data = real_data(*args, **kwargs)
            return self.data

        def predict(path, backend, x, *args, **kwargs):
            probs = real_predict(path, backend, x, *args, **kwargs)
            split = self.data.val if corrupt == "validation" else self.data.test
            return np.roll(probs, 1, axis=1) if x is split.x else probs  # every label moved on

        monkeypatch.setattr(convert, "run_data", run_data)
        monkeypatch.setattr(parity, "predict", predict)


def test_cli_exports_measures_and_installs(tiny_run, tiny_cam_registered, tmp_path, monkeypatch):
    """The official test set's int8 predictions are all wrong here: the export must neither retry nor
    fail because of it, and the temperature is the one fitted on validation."""
    from export import convert
    from train.metrics import fit_temperature

    monkeypatch.setattr(convert, "DEFAULT_BUNDLE", tmp_path / "default")
    monkeypatch.setattr(convert, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "features.tflite").write_bytes(b"old default's separate CAM model")
    spy = SplitSpy(monkeypatch, corrupt="official_test")
    out = tmp_path / "bundles"
    assert _cli(tiny_run, out, "--formats", "tflite-int8", "onnx-int8", "--install-default",
                "--no-ood-gate") == 0  # six images are too few to fit the gate; tests/test_ood.py covers it
    report = json.loads((out / "parity.json").read_text())
    assert report["training_run"] == tiny_run.name and report["gate"]["passed"]
    assert report["gate"]["split"] == "validation"
    assert {a["format"] for a in report["artifacts"]} == {"tflite-int8", "onnx-int8"}
    for a in report["artifacts"]:
        assert a["official_test"]["n"] == 3 and a["validation"]["n"] >= 1
        assert a["validation"]["agreement"] == 1.0 and a["official_test"]["agreement"] == 0.0
        assert len(a["attempts"]) == 1  # the broken test split caused no retry
        assert a["cam_diff"]["mean"] <= CAM_MEAN_TOL and a["cam_diff"]["max"] <= CAM_MAX_TOL  # measured at export
    assert report["calibration"] == {"requested": 6, "used": {"tflite-int8": 3, "onnx-int8": 3}}
    assert "tflite-int8 3 training images" in (out / "parity.md").read_text()
    assert "Official test set" in (out / "parity.md").read_text()
    installed = load_bundle(tmp_path / "default")
    assert installed.backends() == ["tflite", "onnx"]
    assert not (tmp_path / "default" / "features.tflite").exists()
    for backend in installed.backends():
        installed.model_file(backend)  # sha256 verified
    card = installed.card
    assert card["training_run"] == tiny_run.name
    assert card["calibration"]["fitted_on"].startswith("validation")
    # the temperature is fitted on validation (hand-recomputed from the int8 model's validation output)
    val, test = spy.data.val, spy.data.test
    engine = open_engine(installed.model_file("tflite")[0], "tflite")
    want = fit_temperature(val.y, engine.run(val.x))
    on_test = fit_temperature(test.y, np.roll(engine.run(test.x), 1, axis=1))
    assert abs(want - on_test) > 0.1
    assert card["temperature"] == pytest.approx(want, rel=1e-6)
    assert card["metrics"]["official_test"]["n"] == 3
    assert card["metrics"]["validation"]["accuracy"] == report["artifacts"][0]["validation"]["accuracy"]
    assert (tmp_path / "results" / "parity.json").read_text() == (out / "parity.json").read_text()
    assert (tmp_path / "results" / "parity.md").is_file()


def test_cli_retries_and_fails_loudly_when_int8_loses_validation_accuracy(tiny_run, tiny_cam_registered, tiny_export,
                                                                          tmp_path, monkeypatch, capsys):
    """The int8 model's validation predictions are all wrong (its test ones fine): every rung of the
    ladder is tried, the gate fails, nothing is installed. (The conversion itself is replaced by a copy
    of the same model's int8 export, to keep this test fast: the decisions are what it checks.)"""
    from export import convert

    built = []

    def build_artifact(saved, fmt, dest, calibration, work, **options):
        built.append(len(calibration))
        shutil.copyfile(tiny_export.bundle / "model.tflite", dest)
        return dest

    monkeypatch.setattr(convert, "build_artifact", build_artifact)
    monkeypatch.setattr(convert, "_ladder", lambda fmt, n: [{"calibration": n}, {"calibration": 3 * n}])
    monkeypatch.setattr(convert, "DEFAULT_BUNDLE", tmp_path / "default")
    SplitSpy(monkeypatch, corrupt="validation")
    out = tmp_path / "bundles"
    assert _cli(tiny_run, out, "--formats", "tflite-int8", "--install-default") == 3
    assert "EXPORT FAILED" in capsys.readouterr().err
    assert not (tmp_path / "default").exists()
    report = json.loads((out / "parity.json").read_text())
    assert not report["gate"]["passed"] and report["gate"]["failures"]
    (art,) = report["artifacts"]
    assert [a["calibration"] for a in art["attempts"]] == built == [3, 3]  # 3 training images: 3, then 3 * 3 capped
    assert art["official_test"]["agreement"] == 1.0


def test_install_refused_when_the_bundle_is_too_large(tmp_path, capsys):
    from argparse import Namespace

    from export.convert import Target, _finish

    report = {"gate": {"failures": []}, "size": {"int8": {"problems": ["model.onnx: 7.00 MiB > 6 MiB"]}}}
    target = Target("int8", tmp_path, ("tflite-int8", "onnx-int8"), "x")
    args = Namespace(install_default=True, allow_oversize=False)
    assert _finish(report, target, tmp_path, args) == 4
    assert "7.00 MiB" in capsys.readouterr().err
