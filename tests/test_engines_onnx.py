"""ONNX Runtime: the default backend falls back to it when LiteRT is missing, and the int8 graph it runs (issue 35):
every convolution and residual Add on integer kernels, the same labels as LiteRT, the export's uint8 activations."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from _engine_helpers import BACKEND_TOL, _batch, _engine
from _runtime_fixtures import bundle_dir, image_files  # noqa: F401  (fixture)
from cxr_edge import Classifier
from cxr_edge.bundle import load_bundle


def test_default_backend_falls_back_to_onnx_without_litert(bundle_dir, monkeypatch):
    """With neither LiteRT nor tflite_runtime importable, ``Classifier()`` picks ONNX Runtime by itself (no error)
    and labels every scan as the default LiteRT classifier does."""
    files = image_files("train") + image_files("test")
    lite = Classifier(model=bundle_dir)
    assert lite.backend == "tflite"
    want = [r.label for r in lite.classify_many(files)]
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    from cxr_edge.engines import available_backends

    assert available_backends() == ["onnx"]
    clf = Classifier(model=bundle_dir)
    assert clf.backend == "onnx" and clf.model.backend == "onnx"
    results = list(clf.classify_many(files))
    assert all(r.ok for r in results), results
    assert [r.label for r in results] == want


# --- ONNX Runtime int8 speed (issue 35): the graph onnxruntime runs, not a timing ----------------------------

def _ops_after_optimization(path: Path, tmp_path: Path) -> dict[str, int]:
    """Op types (and counts) of the graph onnxruntime's CPU provider actually runs after its optimizations."""
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def test_shipped_onnx_int8_runs_every_convolution_and_add_on_integer_kernels(tmp_path):
    """With int8 activations (S8S8) onnxruntime's x86 provider left 17 of the 49 convolutions and all 9
    residual Adds as float ops between Dequantize/Quantize pairs (int8 no faster than float); the shipped
    U8S8 graph must not."""
    import onnx

    path = load_bundle().model_file("onnx")[0]
    n_conv = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    ops = _ops_after_optimization(path, tmp_path)
    assert n_conv == 49 and ops["QLinearConv"] == n_conv, ops
    assert ops["QLinearAdd"] == 9 and "Conv" not in ops and "Add" not in ops, ops


def test_shipped_onnx_int8_agrees_with_litert():
    x = _batch(load_bundle().root)
    onnx_p, lite_p = _engine(load_bundle().root, "onnx").run(x), _engine(load_bundle().root, "tflite").run(x)
    assert np.array_equal(onnx_p.argmax(1), lite_p.argmax(1))
    assert np.abs(onnx_p - lite_p).max() <= BACKEND_TOL


def _tiny_float_onnx(path: Path) -> np.ndarray:
    """Conv -> ReLU -> Conv -> residual Add -> pooling -> dense -> softmax, float32, made with onnx.helper
    (no TensorFlow): the ops whose int8 kernels decide the speed. Returns calibration images."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = lambda name, *s: numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), name)  # noqa: E731
    w1, w2, wd = w("w1", 8, 4, 1, 1), w("w2", 8, 8, 3, 3), w("wd", 8, 3)
    nodes = [helper.make_node("Conv", ["x", w1.name], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", w2.name], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["a"]), helper.make_node("GlobalAveragePool", ["a"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", wd.name], ["l"]),
             helper.make_node("Softmax", ["l"], ["probs"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])], [w1, w2, wd])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return rng.normal(0, 1, (8, 4, 8, 8)).astype(np.float32)


def test_export_quantizes_activations_to_uint8_and_the_s8s8_conversion_is_exact(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from export.onnx import activations_to_uint8, quantize_int8

    x = _tiny_float_onnx(tmp_path / "float.onnx")
    u8 = quantize_int8(tmp_path / "float.onnx", tmp_path / "u8.onnx", x, batch=4)  # the export's default
    ops = _ops_after_optimization(u8, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and "Conv" not in ops and "Add" not in ops, ops
    s8 = quantize_int8(tmp_path / "float.onnx", tmp_path / "s8.onnx", x, batch=4, activations="int8")
    conv = activations_to_uint8(s8, tmp_path / "s8_to_u8.onnx")
    zps = lambda p: {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer  # noqa: E731
                     if "zero_point" in t.name}
    before, after = zps(s8), zps(conv)
    moved = [k for k in before if before[k].dtype == np.int8 and after[k].dtype == np.uint8]
    assert moved and all(np.array_equal(after[k].astype(int), before[k].astype(int) + 128) for k in moved)
    assert all(np.array_equal(after[k], before[k]) for k in before if k not in moved)  # weights stay int8
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graphs' own arithmetic
    run = lambda p: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(s8), run(conv))
