"""Shared fixtures. ``tiny_bundle``: a real export (``export.convert.make_bundle``, the same path as
``python -m export.convert``: int8 retry ladder, parity gate on validation, temperature, heatmap weights)
of a tiny Keras model trained for a few steps on the six training images in ``tests/data``, as TFLite
int8 + ONNX int8 in one bundle folder. Like the shipped models it has a ``features`` layer before global
average pooling and a dense ``probs`` head, so both model files have two outputs (probabilities
``[N, 3]`` and the feature map ``[N, 15, 15, 32]``) and the bundle carries ``cam.npz``. Built once per test
session (about half a minute on two cores)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cxr_edge.preprocess import InputSpec, load_gray, to_input  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "chest_xray"
TINY_SIZE = 64


def _label(path: Path) -> int:
    name = path.name.lower()
    return 1 if "bacteria" in name else 2 if "virus" in name else 0


def _files(split: str) -> list[Path]:
    return sorted((DATA / split).rglob("*.jpeg"))


def _images(split: str, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    files = _files(split)
    return to_input(np.stack([load_gray(f, spec.size) for f in files]), spec), np.array([_label(f) for f in files])


@dataclass(frozen=True)
class TinyExport:
    model: object  # the Keras float model that was exported (layers "features" and "probs")
    spec: InputSpec
    files: list  # the 6 training + 3 test images
    x: np.ndarray  # float32[N, S, S, 1]: those files, preprocessed
    y: np.ndarray  # their labels
    keras_probs: np.ndarray  # the Keras model's probabilities on x
    bundle: Path  # the exported bundle folder


def tiny_cam_model(size: int = TINY_SIZE):
    """Two conv blocks (batch norm) -> ``features`` -> global average pooling -> dropout -> dense ``probs``:
    the shape of the shipped models' head, small enough to train in seconds."""
    import keras
    from keras import layers

    inp = layers.Input((size, size, 1), name="image")
    x = inp
    for i, filters in enumerate((8, 32)):
        x = layers.Conv2D(filters, 3, strides=2, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    f = layers.Activation("linear", name="features")(x)
    x = layers.Dropout(0.2, name="head_dropout")(layers.GlobalAveragePooling2D(name="gap")(f))
    out = layers.Dense(3, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inp, out, name="tiny_cam")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> TinyExport:
    import keras

    from export.convert import make_bundle

    keras.utils.set_random_seed(0)
    model, spec = tiny_cam_model(), InputSpec(TINY_SIZE, 1 / 255.0, 0.0)
    x_tr, y_tr = _images("train", spec)
    x_te, y_te = _images("test", spec)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x_tr, y_tr, epochs=60, batch_size=len(x_tr), verbose=0)
    # A few steps leave batch-norm's moving statistics far from the batch ones: set them to the
    # training images' statistics so that the inference model (what is exported) fits them too.
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0
    model(x_tr, training=True)
    for layer in bns:
        layer.momentum = 0.99
    x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    probs = model.predict(x, verbose=0)
    root = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    make_bundle(model, spec, root, calibration=x_tr, formats=("tflite-int8", "onnx-int8"),
                name="cxr-edge-test-tiny", version="0.0.1", val=(x_tr, y_tr), test=(x_te, y_te),
                card_extra={"training_run": "tests", "pretrained": "none"})
    return TinyExport(model, spec, _files("train") + _files("test"), x, y, probs, root)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_export) -> Path:
    """Folder of a bundle (card.json + dual-output int8 model.tflite + model.onnx + cam.npz) exported from
    a tiny model."""
    return tiny_export.bundle
