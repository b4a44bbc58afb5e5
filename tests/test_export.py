"""Export stage: a tiny Keras model exported end to end (TFLite int8 + ONNX int8, ``tiny_bundle``) and
read back through the runtime (``cxr_edge.engines``, ``cxr_edge.Classifier``).

Tolerance. Both int8 models quantize every activation to 8 bits with ranges calibrated on the six
training images, and emit probabilities through an 8-bit softmax (steps of 1/256). Measured on this
model the largest probability difference to Keras float32 is about 0.005 (TFLite) and 0.007 (ONNX).
``PROB_TOL = 0.05`` leaves 7-10x headroom for other CPUs' kernels while still catching real export
faults (wrong input scaling, batch-norm left in training mode, class order, a float model passed off as
int8), which move probabilities by 0.1 or more. Labels must agree wherever Keras's top-1 leads its
top-2 by more than 2 * PROB_TOL (there no error within tolerance can flip the label).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr_edge.bundle import BundleError, load_bundle, sha256_file
from cxr_edge.engines import open_engine

PROB_TOL = 0.05
FORBIDDEN_TFLITE = ("Flex", "RANDOM", "IMAGE_PROJECTIVE", "CUSTOM")  # augmentation / TF-only ops
FORBIDDEN_ONNX = ("RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial")


def _check_against_keras(probs: np.ndarray, ref: np.ndarray) -> None:
    assert probs.shape == ref.shape
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=0.02)
    assert np.abs(probs - ref).max() <= PROB_TOL, np.abs(probs - ref).max()
    top2 = np.sort(ref, 1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 2 * PROB_TOL
    assert sure.sum() >= len(ref) // 2, "tiny model too unsure for a label check"
    np.testing.assert_array_equal(probs[sure].argmax(1), ref[sure].argmax(1))


def test_card_describes_the_files(tiny_export):
    b = load_bundle(tiny_export.bundle)
    assert b.backends() == ["tflite", "onnx"]
    assert b.card["input"] == tiny_export.spec.to_card()
    assert b.spec == tiny_export.spec
    for backend in ("tflite", "onnx"):
        entry = b.card["files"][backend]
        path = b.root / entry["path"]
        assert entry["precision"] == "int8"
        assert entry["sha256"] == sha256_file(path)
        assert entry["bytes"] == path.stat().st_size
        assert b.model_file(backend)[0] == path
    assert b.card["training_run"] == "tests"
    assert b.card["date"] and b.card["version"] == "0.0.1"


def test_card_sha256_guards_the_file(tiny_export, tmp_path):
    copy = shutil.copytree(tiny_export.bundle, tmp_path / "b")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy).model_file("onnx")


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_engine_matches_keras(tiny_export, backend):
    b = load_bundle(tiny_export.bundle)
    path, _ = b.model_file(backend)
    engine = open_engine(path, backend, threads=1)
    probs = engine.run(tiny_export.x)
    _check_against_keras(probs, tiny_export.keras_probs)
    # batch size does not matter
    np.testing.assert_allclose(engine.run(tiny_export.x[:1]), probs[:1], atol=1e-5)


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_classifier_matches_keras(tiny_export, backend):
    from cxr_edge import Classifier
    from cxr_edge.labels import CLASS_NAMES

    clf = Classifier(model=tiny_export.bundle, backend=backend)
    results = [clf.classify(f) for f in tiny_export.files]
    probs = np.array([[r.probabilities[c] for c in CLASS_NAMES] for r in results], np.float32)
    _check_against_keras(probs, tiny_export.keras_probs)
    assert [r.label for r in results] == [CLASS_NAMES[i] for i in probs.argmax(1)]


def test_tflite_graph_is_full_int8_builtin(tiny_export):
    from ai_edge_litert.interpreter import Interpreter

    from export.tflite import op_names

    path = tiny_export.bundle / "model.tflite"
    ops = op_names(path)
    assert "CONV_2D" in ops and "FULLY_CONNECTED" in ops
    assert not [o for o in ops if any(bad in o.upper() for bad in (s.upper() for s in FORBIDDEN_TFLITE))], ops
    interp = Interpreter(model_path=str(path))
    assert interp.get_input_details()[0]["dtype"] == np.float32  # float32 interface
    assert interp.get_output_details()[0]["dtype"] == np.float32
    by_op = {}
    for d in interp._get_ops_details():
        by_op.setdefault(d["op_name"], []).append(d)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    for name in ("CONV_2D", "FULLY_CONNECTED"):
        for d in by_op[name]:
            assert tensors[d["inputs"][0]]["dtype"] == np.int8, name  # integer kernels, not float
            assert tensors[d["inputs"][1]]["dtype"] == np.int8, name


def test_onnx_graph_is_int8_qdq(tiny_export):
    import onnx

    model = onnx.load(str(tiny_export.bundle / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert not ops & set(FORBIDDEN_ONNX), ops
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # per-channel weights: some convolution weight scale is a vector
    scales = [t for t in model.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1
              and t.dims[0] > 1]
    assert scales


def test_augmentation_layers_are_refused():
    import keras

    from export.savedmodel import check_inference_model
    from train.models import build

    core = build("baseline", input_size=32).model
    inp = keras.Input((32, 32, 1))
    wrapped = keras.Model(inp, core(keras.layers.RandomRotation(0.1)(inp)))
    check_inference_model(core)
    with pytest.raises(ValueError, match="augmentation"):
        check_inference_model(wrapped)


def test_flex_ops_are_refused(monkeypatch):
    from export import tflite

    monkeypatch.setattr(tflite, "op_names", lambda path: ["CONV_2D", "FlexImageProjectiveTransformV3"])
    with pytest.raises(tflite.ConversionError, match="FlexImageProjectiveTransformV3"):
        tflite.check_builtin_only("model.tflite")


def test_one_model_per_backend():
    from export.convert import _check_formats

    _check_formats(("tflite-int8", "onnx-float32"))
    with pytest.raises(ValueError):
        _check_formats(("tflite-int8", "tflite-float32"))
    with pytest.raises(ValueError):
        _check_formats(("keras",))


def test_gate_uses_validation_drop():
    from export.parity import gate

    def report(val_acc, test_acc):
        art = {"format": "tflite-int8", "precision": "int8", "validation": {"accuracy": val_acc},
               "official_test": {"accuracy": test_acc}}
        return {"keras": {"validation": {"accuracy": 0.90}, "official_test": {"accuracy": 0.90}},
                "artifacts": [art]}

    assert gate(report(0.896, 0.80)) == []  # 0.4 pp on validation passes, whatever the test set says
    assert gate(report(0.894, 0.90))  # 0.6 pp fails


@pytest.fixture(scope="module")
def tiny_run(tiny_export, tmp_path_factory) -> Path:
    """A run folder as ``train.fit`` writes it, holding the tiny model's weights."""
    from train.models import named_weights, save_named

    run = tmp_path_factory.mktemp("runs") / "20260101-000000-tiny"
    run.mkdir()
    cfg = {"model": "baseline", "input_size": tiny_export.spec.size, "dropout": 0.2, "batchnorm": True,
           "protocol": "grouped", "val_fraction": 0.5, "seed": 0, "weights": None}
    (run / "config.json").write_text(json.dumps(cfg))
    save_named(named_weights(tiny_export.model), str(run / "weights.npz"))
    return run


def _cli(run: Path, out: Path, *extra: str) -> int:
    from export.convert import main

    data = Path(__file__).resolve().parent / "data" / "chest_xray"
    return main(["--run", str(run), "--out", str(out), "--data", str(data), "--calibration", "6",
                 "--threads", "1", *extra])


def test_cli_exports_measures_and_installs(tiny_run, tmp_path, monkeypatch):
    from export import convert

    monkeypatch.setattr(convert, "DEFAULT_BUNDLE", tmp_path / "default")
    monkeypatch.setattr(convert, "RESULTS_DIR", tmp_path / "results")
    out = tmp_path / "bundles"
    assert _cli(tiny_run, out, "--formats", "tflite-int8", "onnx-int8", "--install-default",
                "--no-ood-gate") == 0  # six images are too few to fit the gate; tests/test_ood.py covers it
    report = json.loads((out / "parity.json").read_text())
    assert report["training_run"] == tiny_run.name and report["gate"]["passed"]
    assert report["gate"]["split"] == "validation"
    assert {a["format"] for a in report["artifacts"]} == {"tflite-int8", "onnx-int8"}
    for a in report["artifacts"]:
        assert a["official_test"]["n"] == 3 and a["validation"]["n"] >= 1
        assert a["validation"]["agreement"] == 1.0
    assert "Official test set" in (out / "parity.md").read_text()
    installed = load_bundle(tmp_path / "default")
    assert installed.backends() == ["tflite", "onnx"]
    for backend in installed.backends():
        installed.model_file(backend)  # sha256 verified
    card = installed.card
    assert card["training_run"] == tiny_run.name
    assert card["temperature"] > 0 and card["calibration"]["fitted_on"].startswith("validation")
    assert card["metrics"]["official_test"]["n"] == 3
    assert card["metrics"]["validation"]["accuracy"] == report["artifacts"][0]["validation"]["accuracy"]
    assert (tmp_path / "results" / "parity.json").read_text() == (out / "parity.json").read_text()
    assert (tmp_path / "results" / "parity.md").is_file()


def test_cli_fails_loudly_when_int8_loses_accuracy(tiny_run, tmp_path, monkeypatch, capsys):
    from export import convert, parity

    monkeypatch.setattr(parity, "MAX_INT8_DROP_PP", -1.0)  # no int8 model can pass
    monkeypatch.setattr(convert, "_ladder", lambda fmt, n: [{"calibration": n}])
    monkeypatch.setattr(convert, "DEFAULT_BUNDLE", tmp_path / "default")
    out = tmp_path / "bundles"
    assert _cli(tiny_run, out, "--formats", "tflite-int8", "--install-default") == 3
    assert "EXPORT FAILED" in capsys.readouterr().err
    assert not (tmp_path / "default").exists()
    report = json.loads((out / "parity.json").read_text())
    assert not report["gate"]["passed"] and report["gate"]["failures"]
