"""A shipped int8 model's weights read back into Keras (train.unfold): the float model they give answers as the
model that was exported did, for a batch norm after a biased convolution (the tiny export) and for the shipped
EfficientNet-Lite0 bundle through ``train.models.build(weights=<bundle>)``."""
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

from cxr_edge.classifier import Classifier
from cxr_edge.preprocess import load_gray, to_input
from train.models import assign, build
from train.unfold import weights_from_tflite

SHIPPED = Path(__file__).resolve().parents[1] / "cxr_edge" / "models" / "default"
DATA = Path(__file__).resolve().parent / "data" / "chest_xray"


def test_tiny_export_read_back(tiny_export):
    import keras

    from conftest import tiny_cam_model

    keras.utils.set_random_seed(7)
    fresh = tiny_cam_model()
    rng = np.random.default_rng(0)
    for layer in fresh.layers:  # batch norms far from the identity: a reader must set them all
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance):
                v.assign(rng.uniform(0.5, 2.0, v.shape).astype(np.float32))
    before = fresh.predict(tiny_export.x, verbose=0)
    assert np.abs(before - tiny_export.keras_probs).max() > 0.05  # a fresh model answers otherwise
    named = weights_from_tflite(fresh, tiny_export.bundle / "model.tflite")
    assert assign(fresh, named) == len(named)
    after = fresh.predict(tiny_export.x, verbose=0)
    # only the int8 rounding of the weights separates it from the exported float model
    np.testing.assert_allclose(after, tiny_export.keras_probs, atol=0.05)
    assert np.array_equal(after.argmax(1), tiny_export.keras_probs.argmax(1))
    bns = [layer for layer in fresh.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(np.allclose(layer.gamma.numpy(), 1.0) and np.allclose(layer.moving_mean.numpy(), 0.0)
                       for layer in bns)  # folded into the convolutions: identity norms


def test_another_architecture_is_refused(tiny_export):
    import keras
    from keras import layers

    inp = layers.Input((64, 64, 1))
    x = layers.Conv2D(4, 3, name="conv0")(inp)  # 4 filters where the export has 8
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(32, 3, name="conv1")(x)
    x = layers.GlobalAveragePooling2D()(x)
    other = keras.Model(inp, layers.Dense(3)(x))
    with pytest.raises(ValueError, match="do not fit"):
        weights_from_tflite(other, tiny_export.bundle / "model.tflite")


def test_shipped_bundle_as_starting_weights():
    """``build(weights=<bundle>)`` starts from the shipped model: at its own input size the float model gives
    the shipped int8 model's probabilities (before the card's temperature) up to int8 rounding; at another
    input size it builds and runs with the same weights."""
    files = sorted(DATA.rglob("*.jpeg"))
    clf = Classifier(SHIPPED, ood=False, threads=1)
    gray = np.stack([load_gray(f, clf.spec.size) for f in files])
    shipped = clf.engine.run(to_input(gray, clf.spec))
    built = build(clf.card["model"], input_size=clf.spec.size, weights=str(SHIPPED))
    assert built.pretrained == str(SHIPPED)
    mine = built.model.predict(to_input(gray, built.spec), verbose=0)
    # int8 activations, not only int8 weights, stand between the two: the export's parity report gives
    # int8 against float a mean |dp| near 0.01, more on a scan between two classes (0.066 here for one at
    # 0.38 / 0.53, with the squash-blind model); a wrong scale or a lost bias moves every scan by far more
    assert np.abs(mine - shipped).mean() < 0.02
    np.testing.assert_allclose(mine, shipped, atol=0.1)
    assert np.array_equal(mine.argmax(1), shipped.argmax(1))
    other = 96 if clf.spec.size != 96 else 128
    small = build(clf.card["model"], input_size=other, weights=str(SHIPPED))
    p = small.model.predict(to_input(np.stack([load_gray(f, other) for f in files]), small.spec), verbose=0)
    assert p.shape == (len(files), 3) and np.allclose(p.sum(1), 1.0, atol=1e-5)
