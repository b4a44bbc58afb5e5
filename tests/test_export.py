"""Export stage: a tiny Keras model exported end to end (TFLite int8 + ONNX int8, ``tiny_bundle``, two
outputs: probabilities and the feature map) and read back through the runtime (``cxr_edge.engines``,
``cxr_edge.Classifier``). The command's path (``python -m export.convert``): ``tests/test_export_cli.py``.

Tolerance. Both int8 models quantize every activation to 8 bits with ranges calibrated on the six
training images, and emit probabilities through an 8-bit softmax (steps of 1/256). Measured on this
model (tests/conftest.py, seed 0; 2026-11-26) the largest probability difference to Keras float32 is about
0.004 (TFLite) and 0.009 (ONNX). ``PROB_TOL = 0.05`` leaves 5-10x headroom for other CPUs' kernels while
still catching real export
faults (wrong input scaling, batch-norm left in training mode, class order, a float model passed off as
int8), which move probabilities by 0.1 or more. Labels must agree wherever Keras's top-1 leads its
top-2 by more than 2 * PROB_TOL (there no error within tolerance can flip the label).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from _export_common import CAM_MAX_TOL, CAM_MEAN_TOL
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
    assert sorted(p.name for p in b.root.iterdir()) == ["cam.npz", "card.json", "model.onnx", "model.tflite"]
    cam = b.card["cam"]
    assert cam["output"] == "features" and cam["feature_shape"] == [15, 15, 32]
    assert cam["weights"]["sha256"] == sha256_file(b.root / "cam.npz")
    with np.load(b.root / "cam.npz") as z:
        w, bias = tiny_export.model.get_layer("probs").get_weights()
        np.testing.assert_array_equal(z["weights"], w)
        np.testing.assert_array_equal(z["bias"], bias)
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


def test_onnx_model_names_no_path_of_the_exporting_machine(tiny_export):
    import tempfile

    import onnx

    model = onnx.load(str(tiny_export.bundle / "model.onnx"))
    assert tempfile.gettempdir() not in model.graph.doc_string, model.graph.doc_string


def test_tflite_graph_is_full_int8_builtin(tiny_export):
    from ai_edge_litert.interpreter import Interpreter

    from export.tflite import op_names

    path = tiny_export.bundle / "model.tflite"
    ops = op_names(path)
    assert "CONV_2D" in ops and "FULLY_CONNECTED" in ops
    assert not [o for o in ops if any(bad in o.upper() for bad in (s.upper() for s in FORBIDDEN_TFLITE))], ops
    interp = Interpreter(model_path=str(path))
    assert interp.get_input_details()[0]["dtype"] == np.float32  # float32 interface
    assert [d["dtype"] for d in interp.get_output_details()] == [np.float32, np.float32]
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


def _raw_outputs(path: Path, backend: str, x: np.ndarray) -> list[np.ndarray]:
    """Every output of a model file, read with the engine libraries directly (not through cxr_edge's engines; ONNX
    with the runtime's session options, ``cxr_edge.cpu``: unfused int8 where the fused kernels saturate)."""
    if backend == "onnx":
        import onnxruntime as ort

        from cxr_edge.cpu import onnx_session_options

        sess = ort.InferenceSession(str(path), onnx_session_options(ort), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.resize_tensor_input(interp.get_input_details()[0]["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]




@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_one_pass_gives_probabilities_and_a_heatmap_matching_keras(tiny_export, backend):
    from export.cam import cam_maps, keras_features

    b = load_bundle(tiny_export.bundle)
    outs = _raw_outputs(b.model_file(backend)[0], backend, tiny_export.x)
    probs = [o for o in outs if o.ndim == 2]
    feats = [o for o in outs if o.ndim == 4]
    assert len(outs) == 2 and len(probs) == 1 and len(feats) == 1
    assert all(o.dtype == np.float32 for o in outs)
    _check_against_keras(probs[0], tiny_export.keras_probs)
    ref = keras_features(tiny_export.model, tiny_export.x)
    assert feats[0].shape == ref.shape == (len(tiny_export.x), 15, 15, 32)
    with np.load(b.root / "cam.npz") as z:
        w = z["weights"]
    for k in range(3):
        got, want = cam_maps(feats[0], w, k), cam_maps(ref, w, k)
        assert np.abs(got - want).mean() <= CAM_MEAN_TOL and np.abs(got - want).max() <= CAM_MAX_TOL


def test_size_limits_are_checked(tiny_export, monkeypatch):
    from export import convert

    assert convert.size_check(tiny_export.bundle)["problems"] == []
    monkeypatch.setattr(convert, "MAX_MODEL_BYTES", 1000)
    monkeypatch.setattr(convert, "MAX_BUNDLE_BYTES", 2000)
    problems = convert.size_check(tiny_export.bundle)["problems"]
    assert [p.split(":")[0] for p in problems] == ["model.onnx", "model.tflite", "bundle"]


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


def test_int8_retry_reads_validation_only():
    from export.convert import int8_with_retries

    ladder = [{"calibration": 1}, {"calibration": 2}, {"calibration": 3}]

    def run(val_acc, test_acc):
        calls = []

        def attempt(opts):
            calls.append(opts)
            return {"validation": {"accuracy": val_acc}, "official_test": {"accuracy": test_acc}}, opts
        res = int8_with_retries("tflite-int8", ladder, attempt, ref_val_accuracy=0.90)
        return calls, res

    calls, res = run(val_acc=0.90, test_acc=0.10)  # test set collapses: no retry
    assert calls == ladder[:1] and len(res["attempts"]) == 1 and res["options"] == ladder[0]
    calls, res = run(val_acc=0.80, test_acc=0.95)  # validation drops 10 pp: every attempt, whatever the test says
    assert calls == ladder and [a["drop_pp"] for a in res["attempts"]] == [10.0] * 3


def test_onnx_percentile_calibration(tiny_export, tmp_path):
    """The ONNX retry ladder's percentile rung: a model quantized with percentile activation ranges answers as
    the float model does, its ranges are not the min-max ones, and calibration sets no batch size divides work
    (onnxruntime's histogram calibrators need equal batches)."""
    import onnx

    from export import onnx as onnx_x
    from export import savedmodel
    from export.convert import _ladder

    assert {"calibration": 300, "calibrate": "percentile"} in _ladder("onnx-int8", 300)
    assert all("calibrate" not in o for o in _ladder("tflite-int8", 300))
    assert [onnx_x._even_batch(n, 16) for n in (300, 9, 7, 1)] == [15, 9, 7, 1]
    fp32 = onnx_x.from_saved_model(savedmodel.save(tiny_export.model, tmp_path / "sm", tiny_export.spec.size),
                                   tmp_path / "float32.onnx")
    x = tiny_export.x  # 9 images, in batches of 4 asked for: 3 batches of 3
    paths = {c: onnx_x.quantize_int8(fp32, tmp_path / f"{c}.onnx", x, batch=4, calibrate=c)
             for c in ("minmax", "percentile")}
    scales = {}
    for c, path in paths.items():  # through the runtime's engine (unfused on x86 without VNNI: cxr_edge.cpu)
        probs = open_engine(path, "onnx").run(x)
        assert np.array_equal(probs.argmax(1), tiny_export.keras_probs.argmax(1)), c
        # int8 of a tiny model trained hard: one probability 0.1005 off (unfused, an AVX2 CPU), 0.1 fused on VNNI
        np.testing.assert_allclose(probs, tiny_export.keras_probs, atol=0.15)
        model = onnx.load(str(path))
        scales[c] = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                     if t.name.endswith("_scale") and len(t.dims) == 0}
    assert scales["minmax"].keys() == scales["percentile"].keys()
    assert any(not np.isclose(scales["minmax"][k], scales["percentile"][k]) for k in scales["minmax"])
    with pytest.raises(ValueError, match="calibrate"):
        onnx_x.quantize_int8(fp32, tmp_path / "x.onnx", x, calibrate="entropy")


def test_fine_features_put_a_finer_map_beside_the_last_one(tiny_export, tmp_path):
    """``--fine-features LAYER``: one feature output holding the last map on LAYER's grid (nearest, cropped)
    and LAYER's channels; the heatmap reads the first channels and still matches Keras; one pass."""
    from cxr_edge import Classifier
    from export.cam import cam_maps, keras_features
    from export.convert import make_bundle

    model, x = tiny_export.model, tiny_export.x
    last = keras_features(model, x)  # [N, 15, 15, 32]
    fine = keras_features(model, x, "relu0")  # the stride-2 map of conv0 (8 channels) is finer
    n, h, w, c = last.shape
    fh, fw = model.get_layer("relu0").output.shape[1:3]
    assert fine.shape == (n, fh, fw, c + 8) and fh > h
    f = -(-fh // h)
    up = last.repeat(f, axis=1).repeat(f, axis=2)[:, :fh, :fw]
    np.testing.assert_allclose(fine[..., :c], up, atol=1e-6)  # the last map, each cell over its f x f block
    np.testing.assert_allclose(fine[..., c:], keras_features_of(model, "relu0", x), atol=1e-6)

    root = tmp_path / "fine"
    # Calibrated on every image measured: the concatenated output has one int8 scale, set by the wider of the
    # two maps' ranges (relu0 is unbounded here; Lite's ReLU6 maps share 0..6).
    make_bundle(model, tiny_export.spec, root, calibration=x, formats=("tflite-int8", "onnx-int8"),
                val=(x, tiny_export.y), fine_features="relu0")
    b = load_bundle(root)
    assert b.card["cam"]["feature_shape"] == [fh, fw, c + 8] and b.card["cam"]["cam_channels"] == c
    assert b.card["cam"]["fine"]["layer"] == "relu0"
    with np.load(root / "cam.npz") as z:
        weights = z["weights"]
    for backend in ("tflite", "onnx"):
        outs = _raw_outputs(b.model_file(backend)[0], backend, x)
        assert len(outs) == 2 and [o.ndim for o in outs].count(4) == 1  # still one pass, two outputs
        feats = next(o for o in outs if o.ndim == 4)
        assert feats.shape == fine.shape
        for k in range(3):  # measured (2026-11-27): mean 0.009, worst cell 0.34 (31x31 cells, one shared scale)
            d = np.abs(cam_maps(feats, weights, k) - cam_maps(fine, weights, k))
            assert d.mean() <= CAM_MEAN_TOL and d.max() <= 2 * CAM_MAX_TOL
        r = Classifier(model=root, backend=backend, ood=False, heatmaps=True).classify(tiny_export.files[0])
        k = ["normal", "bacterial", "viral"].index(r.label)
        assert r.heatmap.shape == (fh, fw)
        assert np.abs(r.heatmap - cam_maps(fine[:1], weights, k)[0]).mean() <= CAM_MEAN_TOL


def keras_features_of(model, layer: str, x: np.ndarray) -> np.ndarray:
    import keras

    return keras.Model(model.inputs, model.get_layer(layer).output).predict(x, verbose=0)
