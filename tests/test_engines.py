"""Inference engines and the Classifier on a real exported bundle (no stubs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _engine_helpers import BACKEND_TOL, _batch, _engine
from _runtime_fixtures import (bundle_dir, fixed_batch_bundle_dir, float_io_bundle_dir, image_files,  # noqa: F401
                               int8_io_bundle_dir, label_of)
from cxr_edge import Classifier, EngineError, open_engine
from cxr_edge.bundle import load_bundle
from cxr_edge.classifier import calibrate
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import load_gray, to_input

REPO = Path(__file__).resolve().parent.parent
# int8 vs float32 I/O tensors of one converted network: only the input quantization (step = the input
# scale, ~1/128 of the range) and the output's 1/256 steps differ.
IO_TOL = 0.02


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
def test_run_full_gives_probabilities_and_the_feature_map_of_one_pass(bundle_dir, backend):
    x = _batch(bundle_dir)
    engine = _engine(bundle_dir, backend)
    if not engine.has_features:
        pytest.skip("single-output bundle")
    probs, feats = engine.run_full(x)
    np.testing.assert_allclose(probs, engine.run(x), atol=1e-6)
    assert feats.ndim == 4 and len(feats) == len(x) and feats.dtype == np.float32
    one = engine.run_full(x[3:4])[1]
    np.testing.assert_allclose(one, feats[3:4], atol=1e-5)
    assert np.abs(feats[0] - feats[1]).max() > 0  # real per-image maps
    cam = load_bundle(bundle_dir).card.get("cam")
    if cam and "feature_shape" in cam:
        assert list(feats.shape[1:]) == cam["feature_shape"]


def test_predict_full_embedding_is_the_pooled_feature_map(bundle_dir):
    clf = Classifier(model=bundle_dir, ood=False)
    gray = np.stack([load_gray(f, clf.spec.size) for f in image_files("test")])
    probs, emb, feats = clf.predict_full(gray)
    np.testing.assert_allclose(probs, clf.predict(gray), atol=1e-6)
    if feats is None:
        assert emb is None
        return
    assert emb.shape == (len(gray), feats.shape[-1])
    np.testing.assert_allclose(emb, feats.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_a_failed_run_is_an_error_not_a_switch_to_batches_of_one(bundle_dir, monkeypatch):
    """TFLite: a failure while running a batch the model can take is reported, and the engine keeps
    running whole batches afterwards (only a graph with a baked-in batch size is run in chunks)."""
    x = _batch(bundle_dir)
    engine = _engine(bundle_dir, "tflite")
    engine.run(x)
    calls = []
    real = engine._interp.invoke

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return real()

    monkeypatch.setattr(engine._interp, "invoke", flaky)
    with pytest.raises(EngineError, match="simulated failure"):
        engine.run(x)
    out = engine.run(x)
    assert out.shape == (len(x), 3) and len(calls) == 2 and not engine._fixed_batch
    if engine._dynamic_batch:  # also right after a resize to a new batch size
        calls.clear()
        with pytest.raises(EngineError, match="simulated failure"):
            engine.run(x[:3])
        assert engine.run(x[:3]).shape == (3, 3) and not engine._fixed_batch


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


@pytest.mark.parametrize("threads,decode", [(1, None), (3, None), (1, 0)])
def test_classify_many_matches_classify_and_keeps_order(bundle_dir, tmp_path, threads, decode):
    """Decoding in a thread pool ahead of batched inference (or inline, ``decode_threads=0``, as batch
    workers do): results in input order, a bad file in the middle fails alone, every other result equals
    classifying the file on its own."""
    clf = Classifier(model=bundle_dir, threads=threads, decode_threads=decode)
    clf.batch_size = 2  # several batches and a partial last one
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    files = image_files("train") + [bad] + image_files("test")
    results = list(clf.classify_many(files))
    assert [r.path for r in results] == [str(f) for f in files]
    assert [r.ok for r in results] == [f != bad for f in files]
    assert results[len(image_files("train"))].error == "not an image Pillow can read"
    for f, r in zip(files, results):
        if r.ok:
            single = clf.classify(f)
            assert single.label == r.label
            for c in CLASS_NAMES:
                assert abs(single.probabilities[c] - r.probabilities[c]) < 1e-5
    assert len(list(clf.classify_many([]))) == 0


def test_decoding_runs_in_the_pool(bundle_dir, monkeypatch):
    import threading

    import cxr_edge.classifier as classifier_mod

    seen = []
    real = classifier_mod.load_with_info

    def spy(source, size, colour=True):
        seen.append(threading.current_thread().name)
        return real(source, size, colour)

    monkeypatch.setattr(classifier_mod, "load_with_info", spy)
    clf = Classifier(model=bundle_dir, threads=2, ood=False)
    assert all(r.ok for r in clf.classify_many(image_files("train")))
    assert len(seen) == len(image_files("train")) and all(n.startswith("cxr-edge-decode") for n in seen)


def test_lanes_run_the_model_on_their_own_copies(bundle_dir, monkeypatch):
    """classify_many's lanes each run the model on a one-thread copy of their own, in the lane's thread (never
    the classifier's own engine, which ``classify`` may be using), and keep the copies for the next call."""
    import threading

    import cxr_edge.classifier as classifier_mod

    opened, used = [], []
    real_open = classifier_mod.open_engine

    def spy_open(path, backend, threads=None):
        engine = real_open(path, backend, threads=threads)
        real_run = engine.run

        def run(x):
            used.append((id(engine), threading.current_thread().name))
            return real_run(x)

        engine.run = run
        opened.append((engine, threads))
        return engine

    monkeypatch.setattr(classifier_mod, "open_engine", spy_open)
    clf = Classifier(model=bundle_dir, threads=2, ood=False)
    clf.batch_size = 1
    files = image_files("train") + image_files("test")
    first = [r.to_dict() for r in clf.classify_many(files)]
    for _ in range(3):
        assert [r.to_dict() for r in clf.classify_many(files)] == first
    lanes = opened[1:]  # opened[0] is the classifier's own engine
    # At most one copy per lane over four calls: the copies are kept and reused, never opened per call.
    assert 1 <= len(lanes) <= 2 and all(threads == 1 for _, threads in lanes)
    assert {e for e, _ in used} <= {id(e) for e, _ in lanes}
    assert len(used) == 4 * len(files) and all(name.startswith("cxr-edge-decode") for _, name in used)


def test_a_refused_input_is_a_rejection_and_a_bug_is_not_an_input_error(bundle_dir, monkeypatch):
    import cxr_edge.classifier as classifier_mod
    from cxr_edge.preprocess import InputRejected

    files = image_files("test")
    real = classifier_mod.load_with_info

    def refuse_second(source, size, colour=True):
        if source == files[1]:
            raise InputRejected("CT, not a radiograph")
        return real(source, size, colour)

    monkeypatch.setattr(classifier_mod, "load_with_info", refuse_second)
    clf = Classifier(model=bundle_dir, ood=False)
    results = list(clf.classify_many(files))
    assert [r.status for r in results] == ["ok", "rejected", "ok"]
    assert results[1].reason == "CT, not a radiograph" and results[1].to_dict()["status"] == "rejected"
    assert clf.classify(files[1]).status == "rejected"

    def broken(source, size, colour=True):
        raise TypeError("a programming error")

    monkeypatch.setattr(classifier_mod, "load_with_info", broken)
    with pytest.raises(TypeError):  # not turned into a per-file error
        list(clf.classify_many(files))


def test_default_backend_is_tflite(bundle_dir):
    assert Classifier(model=bundle_dir).backend == "tflite"


def test_calibrate_against_hand_computed_values():
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], np.float32)
    # T = 2: softmax(log p / 2) = sqrt(p) / sum(sqrt(p)); 0.83666, 0.44721, 0.31623 (sum 1.60010) and
    # 0.5, 0.5, 0.70711 (sum 1.70711)
    np.testing.assert_allclose(calibrate(p, 2.0), [[0.522880, 0.279490, 0.197630], [0.292893, 0.292893, 0.414214]],
                               atol=1e-5)
    # T = 0.5: p^2 / sum(p^2); 0.49, 0.04, 0.01 (sum 0.54) and 0.0625, 0.0625, 0.25 (sum 0.375)
    np.testing.assert_allclose(calibrate(p, 0.5), [[0.907407, 0.074074, 0.018519], [0.166667, 0.166667, 0.666667]],
                               atol=1e-5)
    np.testing.assert_allclose(calibrate(np.array([[0.0, 0.4, 0.6]], np.float32), 2.0)[0, 0], 0.0, atol=1e-5)


def test_temperature_of_the_card_is_applied_to_the_raw_model_output(bundle_dir, tmp_path):
    import shutil
    hot = tmp_path / "hot"
    shutil.copytree(bundle_dir, hot)
    card = json.loads((hot / "card.json").read_text())
    card["temperature"] = 2.0
    (hot / "card.json").write_text(json.dumps(card))
    f = image_files("test")[1]
    clf = Classifier(model=hot, backend="onnx")
    warm = clf.classify(f)
    raw = _engine(bundle_dir, "onnx").run(to_input(load_gray(f, clf.spec.size)[None], clf.spec))[0]
    expect = np.sqrt(raw) / np.sqrt(raw).sum()  # softmax(log p / 2), computed another way
    np.testing.assert_allclose([warm.probabilities[c] for c in CLASS_NAMES], expect, atol=1e-5)
    assert warm.label == CLASS_NAMES[int(np.argmax(raw))]


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


def test_the_shipped_model_labels_the_shipped_scans():
    """The embedded default model on the real scans in tests/data (6 of its training images, 3 official test
    images): a stub (constant probabilities, a swapped class order, a broken input scaling) cannot pass.
    The shipped model misses one of the nine (a normal test scan called viral), so 8 of 9 are required."""
    files = image_files("train") + image_files("test")
    truth = [label_of(f) for f in files]
    for backend in ("tflite", "onnx"):
        results = list(Classifier(backend=backend).classify_many(files))
        assert all(r.ok for r in results)
        got = [CLASS_NAMES.index(r.label) for r in results]
        assert sum(g == t for g, t in zip(got, truth)) >= len(files) - 1, (backend, got, truth)
        assert set(got) == {0, 1, 2}
        assert all(r.probabilities[r.label] > 0.5 for r, g, t in zip(results, got, truth) if g == t)
