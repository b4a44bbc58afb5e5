"""Model bundles for the runtime tests.

``bundle_dir`` is the export stage's ``tiny_bundle`` (tests/conftest.py: a tiny Keras model exported with
``export.convert.make_bundle`` as int8 TFLite + int8 ONNX); ``CXR_EDGE_TEST_BUNDLE=<folder>`` runs the
runtime tests against another bundle instead (the tests only assume classes and a tflite + onnx model).

``float_io_bundle_dir`` / ``int8_io_bundle_dir`` are built here, for the engine's quantized-I/O path: the same
tiny CNN (fixed seed, a few steps on the test images) converted to full-integer TFLite twice, once with float32
input/output tensors and once with int8 ones (plus an int8 QDQ ONNX model via tf2onnx + onnxruntime
quantization). Like exported bundles (contract 1) every model has two outputs, the probabilities ``[N, 3]`` and
the feature map ``[N, 15, 15, 16]`` (layer ``features``), and the bundle carries ``cam.npz`` (except the
fixed-batch one, whose head is not global-average-pooled). TensorFlow is only imported here, in the test
process, never by the runtime. Built bundles are cached in pytest's cache folder (``.pytest_cache``), so
reruns take no TensorFlow time.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import InputSpec, load_gray, to_input

DATA = Path(__file__).resolve().parent / "data" / "chest_xray"
SIZE = 64
SPEC = InputSpec(size=SIZE, scale=1.0 / 128.0, offset=-127.0 / 128.0)
BUILD_VERSION = "4"  # bump when the builder changes (4: dual outputs + cam.npz)
BUNDLE_ENV = "CXR_EDGE_TEST_BUNDLE"


def image_files(split: str = "train") -> list[Path]:
    return sorted(p for p in (DATA / split).rglob("*.jpeg"))


def label_of(path: Path) -> int:
    name = path.name.lower()
    return 1 if "bacteria" in name else 2 if "virus" in name else 0


def _dataset(spec: InputSpec = SPEC):
    files = image_files("train") + image_files("test")
    x = to_input(np.stack([load_gray(f, spec.size) for f in files]), spec)
    y = np.array([label_of(f) for f in files])
    return x, y


def build_bundle(root: Path, int8_io: bool = False, fixed_batch: bool = False) -> Path:
    """Write card.json + model.tflite + model.onnx into ``root``. ``fixed_batch``: a graph exported for batch
    size 1 only, with a Flatten whose reshape bakes that size in (the engines must loop over a batch)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import keras
    import tf2onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from cxr_edge.bundle import write_bundle

    root.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    x, y = _dataset()
    inp = keras.Input((SIZE, SIZE, 1))
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(h)
    features = keras.layers.Activation("linear", name="features")(h)
    if fixed_batch:
        h = keras.layers.Flatten()(keras.layers.MaxPooling2D(8)(features))
    else:
        h = keras.layers.GlobalAveragePooling2D()(features)
    probs = keras.layers.Dense(3, activation="softmax", name="dense" if fixed_batch else "probs")(h)
    classifier = keras.Model(inp, probs)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    classifier.fit(x, y, epochs=40, batch_size=len(x), verbose=0)
    model = keras.Model(inp, [probs, features])  # same layers: one pass, two outputs

    sig = [tf.TensorSpec([1 if fixed_batch else None, SIZE, SIZE, 1], tf.float32, name="input")]
    fn = tf.function(lambda t: model(t, training=False), input_signature=sig)
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    concrete = convert_variables_to_constants_v2(fn.get_concrete_function())  # no resource variables left

    def rep():
        for i in range(len(x)):
            yield [x[i:i + 1]]

    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Statistics for quantized inputs were expected" (int8 I/O)
        (root / "model.tflite").write_bytes(conv.convert())

    float_onnx = root / "float.onnx"
    tf2onnx.convert.from_function(fn, input_signature=sig, opset=17, output_path=str(float_onnx))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter({"input": x[i:i + 1]} for i in range(len(x)))

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(float_onnx), str(root / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    float_onnx.unlink()

    card = {"name": "cxr-edge-test-tiny", "version": "0.0.1", "classes": list(CLASS_NAMES),
            "input": SPEC.to_card(), "training_run": "tests", "date": "2026-01-01",
            "files": {"tflite": {"precision": "int8"}, "onnx": {"precision": "int8"}}}
    from export.cam import write_cam

    cam = write_cam(classifier, root)  # None for the fixed-batch head
    if cam:
        card["cam"] = cam
    write_bundle(root, card, {"tflite": root / "model.tflite", "onnx": root / "model.onnx"})
    return root


def cached_bundle(request, key: str, **options) -> Path:
    name = f"cxr_edge_runtime_{key}_v{BUILD_VERSION}"
    cache = getattr(request.config, "cache", None)  # none with -p no:cacheprovider: use a temporary folder
    root = Path(cache.mkdir(name)) if cache is not None else request.getfixturevalue("tmp_path_factory").mktemp(name)
    if not (root / "card.json").is_file():
        build_bundle(root, **options)
    return root


@pytest.fixture(scope="session")
def bundle_dir(request) -> Path:
    """The bundle the runtime tests use: the export stage's ``tiny_bundle``, or the bundle folder named by
    ``$CXR_EDGE_TEST_BUNDLE`` (to run the runtime tests against a real export, e.g. the default model)."""
    override = os.environ.get(BUNDLE_ENV)
    if override:
        return Path(override)
    return Path(request.getfixturevalue("tiny_bundle"))


@pytest.fixture(scope="session")
def float_io_bundle_dir(request) -> Path:
    """A bundle built here whose TFLite model has float32 input and output tensors."""
    return cached_bundle(request, "float_io")


@pytest.fixture(scope="session")
def int8_io_bundle_dir(request) -> Path:
    """The same network as ``float_io_bundle_dir`` with int8 input and output tensors."""
    return cached_bundle(request, "int8_io", int8_io=True)


@pytest.fixture(scope="session")
def fixed_batch_bundle_dir(request) -> Path:
    """A bundle whose models only accept batches of exactly one (static batch dimension)."""
    return cached_bundle(request, "fixed_batch", fixed_batch=True)
