"""Inference engines and the Classifier on a real exported bundle (no stubs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _runtime_fixtures import (bundle_dir, fixed_batch_bundle_dir, float_io_bundle_dir, image_files,  # noqa: F401
                               int8_io_bundle_dir)
from cxr_edge import Classifier, EngineError, open_engine
from cxr_edge.bundle import load_bundle
from cxr_edge.classifier import calibrate
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import load_gray, to_input

REPO = Path(__file__).resolve().parent.parent

# The TFLite and ONNX int8 models are quantized independently (different converters, calibration statistics
# and rounding), and TFLite also quantizes the softmax output in steps of 1/256 ~ 0.004. So the two differ by a
# few quantization steps per activation; on the tiny bundle that is a max of ~0.008 over these 9 images.
# 0.05 leaves ~6x margin for other toolchain versions yet still catches real faults (wrong input scaling,
# layout or class order move probabilities by 0.3-1.0).
BACKEND_TOL = 0.05
# int8 vs float32 I/O tensors of one converted network: only the input quantization (step = the input
# scale, ~1/128 of the range) and the output's 1/256 steps differ.
IO_TOL = 0.02


def _batch(bundle: Path) -> np.ndarray:
    spec = load_bundle(bundle).spec
    files = image_files("train") + image_files("test")
    return to_input(np.stack([load_gray(f, spec.size) for f in files]), spec)


def _engine(bundle: Path, backend: str, threads=1):
    b = load_bundle(bundle)
    path, _ = b.model_file(backend)
    return open_engine(path, backend, threads=threads)


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_engine_output_is_probabilities(bundle_dir, backend):
    x = _batch(bundle_dir)
    probs = _engine(bundle_dir, backend).run(x)
    assert probs.shape == (len(x), 3) and probs.dtype == np.float32
    assert np.all(probs >= 0) and np.all(probs <= 1.0 + 1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.02)  # int8 output steps of 1/256


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_batch_equals_one_by_one(bundle_dir, backend):
    x = _batch(bundle_dir)
    engine = _engine(bundle_dir, backend)
    whole = engine.run(x)
    single = np.concatenate([engine.run(x[i:i + 1]) for i in range(len(x))])
    odd = engine.run(x[:5])  # a second resize, to a different batch size
    np.testing.assert_allclose(whole, single, atol=1e-5)
    np.testing.assert_allclose(odd, single[:5], atol=1e-5)


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_model_with_a_static_batch_of_one_runs_any_batch(fixed_batch_bundle_dir, backend):
    x = _batch(fixed_batch_bundle_dir)
    engine = _engine(fixed_batch_bundle_dir, backend)
    if backend == "onnx":
        assert engine._sess.get_inputs()[0].shape[0] == 1  # the graph really is fixed to batch 1
    whole = engine.run(x)
    assert whole.shape == (len(x), 3)
    single = np.concatenate([engine.run(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(whole, single, atol=1e-5)


def test_tflite_and_onnx_agree(bundle_dir):
    x = _batch(bundle_dir)
    pt = _engine(bundle_dir, "tflite").run(x)
    po = _engine(bundle_dir, "onnx").run(x)
    assert np.abs(pt - po).max() < BACKEND_TOL
    # Where one class clearly leads, both backends name it.
    top2 = np.sort(pt, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * BACKEND_TOL
    assert np.array_equal(pt.argmax(1)[clear], po.argmax(1)[clear])


def test_int8_input_and_output_tensors_are_dequantized(float_io_bundle_dir, int8_io_bundle_dir):
    """A TFLite model with int8 input/output tensors gives the probabilities of the float-I/O one."""
    x = _batch(int8_io_bundle_dir)
    engine = _engine(int8_io_bundle_dir, "tflite")
    details = engine._interp.get_input_details()[0]
    assert np.dtype(details["dtype"]) == np.int8
    assert np.dtype(engine._interp.get_output_details()[0]["dtype"]) == np.int8
    probs = engine.run(x)
    assert probs.dtype == np.float32 and probs.shape == (len(x), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.02)
    ref_engine = _engine(float_io_bundle_dir, "tflite")
    assert np.dtype(ref_engine._interp.get_input_details()[0]["dtype"]) == np.float32
    ref = ref_engine.run(x)
    assert np.abs(probs - ref).max() < IO_TOL
    assert np.array_equal(probs.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(engine.run(x[:1]), probs[:1], atol=1e-6)


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_engine_rejects_bad_input(bundle_dir, backend):
    engine = _engine(bundle_dir, backend)
    size = load_bundle(bundle_dir).spec.size
    with pytest.raises(EngineError):
        engine.run(np.zeros((1, size, size), np.float32))  # no channel axis
    with pytest.raises(EngineError):
        engine.run(np.zeros((1, size + 1, size + 1, 1), np.float32))


def test_open_engine_errors(tmp_path, bundle_dir):
    with pytest.raises(EngineError, match="no such model file"):
        open_engine(tmp_path / "missing.tflite")
    with pytest.raises(EngineError, match="unknown backend"):
        open_engine(tmp_path / "x.bin", "tensorrt")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(EngineError):
        open_engine(junk)
    with pytest.raises(EngineError):
        open_engine(junk.rename(tmp_path / "junk.tflite"))
    with pytest.raises(EngineError, match="threads"):
        open_engine(load_bundle(bundle_dir).model_file("onnx")[0], threads=0)


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_classifier_result(bundle_dir, backend):
    clf = Classifier(model=bundle_dir, backend=backend, threads=1)
    f = image_files("test")[0]
    r = clf.classify(f)
    assert r.ok and r.path == str(f) and r.label in CLASS_NAMES
    assert list(r.probabilities) == list(CLASS_NAMES)
    assert r.label == max(r.probabilities, key=r.probabilities.get)
    card = json.loads((bundle_dir / "card.json").read_text())
    assert r.model.sha256 == card["files"][backend]["sha256"]
    d = r.to_dict()
    assert set(d) - {"status"} == {"path", "label", "probabilities", "model"}
    assert d.get("status", "ok") == "ok" and ("status" in d) == ("ood" in card)
    assert set(d["model"]) == {"name", "version", "sha256"}
    with pytest.raises(Exception):
        r.label = "viral"  # frozen
    with pytest.raises(TypeError):
        r.probabilities["viral"] = 1.0  # read-only mapping


def test_classify_many_matches_classify_and_keeps_order(bundle_dir, tmp_path):
    clf = Classifier(model=bundle_dir, threads=1)
    clf.batch_size = 4
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    files = image_files("train") + [bad] + image_files("test")
    results = list(clf.classify_many(files))
    assert [r.path for r in results] == [str(f) for f in files]
    assert [r.ok for r in results] == [f != bad for f in files]
    assert results[len(image_files("train"))].error
    for f, r in zip(files, results):
        if r.ok:
            single = clf.classify(f)
            assert single.label == r.label
            for c in CLASS_NAMES:
                assert abs(single.probabilities[c] - r.probabilities[c]) < 1e-5


def test_default_backend_is_tflite(bundle_dir):
    assert Classifier(model=bundle_dir).backend == "tflite"


def test_temperature(bundle_dir, tmp_path):
    import shutil
    hot = tmp_path / "hot"
    shutil.copytree(bundle_dir, hot)
    card = json.loads((hot / "card.json").read_text())
    t0 = float(card.get("temperature", 1.0))  # the bundle's own temperature, if any
    card["temperature"] = 2.0
    (hot / "card.json").write_text(json.dumps(card))
    f = image_files("test")[1]
    plain = Classifier(model=bundle_dir, backend="onnx").classify(f)
    warm = Classifier(model=hot, backend="onnx").classify(f)
    p = np.array([[plain.probabilities[c] for c in CLASS_NAMES]], np.float32)
    p = calibrate(p, 1.0 / t0)  # undo the bundle's own temperature: the model's raw output
    expect = calibrate(p, 2.0)[0]
    np.testing.assert_allclose([warm.probabilities[c] for c in CLASS_NAMES], expect, atol=1e-5)
    assert warm.label == plain.label
    assert max(warm.probabilities.values()) <= max(plain.probabilities.values()) + 1e-6
    np.testing.assert_allclose(calibrate(p, 1.0), p)


def test_runtime_never_imports_tensorflow(bundle_dir):
    """Import the runtime and classify a scan with both backends in a fresh interpreter: no TensorFlow/Keras."""
    scan = image_files("test")[0]
    code = ("import sys, cxr_edge.cli, cxr_edge.classifier, cxr_edge.engines, cxr_edge.dicom\n"
            "from cxr_edge import Classifier\n"
            "for backend in ('tflite', 'onnx'):\n"
            "    print(Classifier(model=sys.argv[1], backend=backend).classify(sys.argv[2]).label)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'tf2onnx')]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bundle_dir), str(scan)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(proc.stdout.split()) == 2
