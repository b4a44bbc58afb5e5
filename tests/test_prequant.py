"""export.prequant: the gray-input fold is the same function in float, and bias correction cancels the mean
shift that per-channel int8 rounding of the kernels puts on each channel (measured here with the
kernels rounded as the converters round them, and end to end through a TFLite int8 conversion)."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

from export.prequant import _int8_error, bias_correct, fold_gray_input, foldable
from train.models import GRAY_REPEAT, build


def _dc_model(size: int = 16, depthwise: bool = True):
    """Gray input repeated to RGB -> conv + batch norm -> (depthwise conv + batch norm) -> pooled dense:
    large kernels of opposite sign across the RGB channels (they cancel on gray input), batch norms far
    from the identity."""
    import keras
    from keras import layers

    inp = layers.Input((size, size, 1), name="image")
    x = layers.Concatenate(name=GRAY_REPEAT)([inp, inp, inp])
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    if depthwise:
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw_conv")(x)
        x = layers.BatchNormalization(name="dw_bn")(x)
        x = layers.ReLU(6.0, name="dw_relu")(x)
    f = layers.Activation("linear", name="features")(x)
    out = layers.Dense(3, activation="softmax", name="probs")(layers.GlobalAveragePooling2D(name="gap")(f))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(3)
    k = rng.normal(0, 0.05, (3, 3, 3, 6)).astype(np.float32)
    k[:, :, 0, :3] += 4.0  # red minus green: cancels on a gray image
    k[:, :, 1, :3] -= 4.0
    model.get_layer("stem_conv").set_weights([k])
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 3.0, c), rng.uniform(0.5, 2.0, c), rng.uniform(-0.1, 0.1, c),
                               rng.uniform(0.05, 0.5, c)])
    if depthwise:
        model.get_layer("dw_conv").set_weights([rng.normal(0.3, 0.6, (3, 3, 6, 1)).astype(np.float32)])
    return model


def _images(n: int = 40, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(5)
    return (1.5 + 0.3 * rng.standard_normal((n, size, size, 1))).astype(np.float32)


def test_fold_is_the_same_function_with_one_input_channel():
    model = _dc_model()
    folded = fold_gray_input(model)
    assert foldable(model) and folded is not model
    assert GRAY_REPEAT not in [layer.name for layer in folded.layers]
    assert folded.get_layer("stem_conv").get_weights()[0].shape == (3, 3, 1, 6)
    x = _images()
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    assert GRAY_REPEAT in [layer.name for layer in model.layers]  # the original is left as it was


def test_models_without_a_foldable_repeat_are_returned_as_they_are():
    import keras
    from keras import layers

    inp = layers.Input((16, 16, 1))
    plain = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(inp))))
    assert not foldable(plain) and fold_gray_input(plain) is plain
    inp = layers.Input((16, 16, 1))
    rgb = layers.Concatenate(name=GRAY_REPEAT)([inp, inp, inp])  # read by a depthwise conv: not a sum
    dw = keras.Model(inp, layers.GlobalAveragePooling2D()(layers.DepthwiseConv2D(3)(rgb)))
    assert not foldable(dw) and fold_gray_input(dw) is dw
    inp = layers.Input((16, 16, 1))
    other = layers.Activation("relu")(inp)
    mixed = layers.Concatenate(name=GRAY_REPEAT)([inp, other, inp])  # not one channel three times
    odd = keras.Model(inp, layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(mixed)))
    assert not foldable(odd) and fold_gray_input(odd) is odd


def test_fold_applies_to_the_registry_baseline():
    built = build("baseline", input_size=32)
    folded = fold_gray_input(built.model)
    x = _images(4, 32)
    np.testing.assert_allclose(folded.predict(x, verbose=0), built.model.predict(x, verbose=0), atol=1e-5)


def _pre_activation(model, name: str, x: np.ndarray, rounded: bool) -> np.ndarray:
    """Per-channel mean of batch norm ``name``'s output on ``x``, the kernel of the convolution before it
    rounded to int8 (with the batch norm folded in, as the converters do) when ``rounded``."""
    import keras

    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    if rounded:
        for layer in twin.layers:
            if type(layer) not in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
                continue
            depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
            bn = next(b for b in twin.layers if isinstance(b, keras.layers.BatchNormalization)
                      and b.input is layer.output)
            if bn.name != name:
                continue
            s = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
            shape = (1, 1, -1, 1) if depthwise else (1, 1, 1, -1)
            w = layer.get_weights()[0]
            layer.set_weights([w + _int8_error(w * s.reshape(shape), depthwise) / s.reshape(shape)])
    sub = keras.Model(twin.inputs, twin.get_layer(name).output)
    return sub.predict(x, verbose=0)[:, 2:-2, 2:-2].mean(axis=(0, 1, 2))  # away from the zero padding


@pytest.mark.parametrize("layer", ["stem_bn", "dw_bn"])
def test_bias_correction_cancels_the_mean_shift_of_int8_kernels(layer):
    model = fold_gray_input(_dc_model())
    x = _images()
    corrected, n = bias_correct(model, x)
    assert n == 2
    want = _pre_activation(model, layer, x, rounded=False)
    before = np.abs(_pre_activation(model, layer, x, rounded=True) - want)
    after = np.abs(_pre_activation(corrected, layer, x, rounded=True) - want)
    assert before.max() > 1e-3  # the rounding does shift this layer
    assert after.max() < 0.25 * before.max()
    assert after.mean() < 0.25 * before.mean()


def test_prepared_model_converts_closer_to_float(tmp_path):
    """Through the real TFLite int8 converter: the prepared model's int8 feature map lies closer to the
    float model's than the unprepared model's does."""
    import keras
    import tensorflow as tf

    from export import cam, savedmodel
    from export.parity import features

    model = _dc_model(depthwise=True)
    x = _images(60)
    ready, _ = bias_correct(fold_gray_input(model), x[:40])
    ref = keras.Model(model.inputs, model.get_layer("features").output).predict(x[40:], verbose=0)
    gaps = {}
    for name, m in (("plain", model), ("prepared", ready)):
        saved = savedmodel.save(cam.dual_output(m), tmp_path / name, 16)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([x[i:i + 1]] for i in range(40))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.float32
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(conv.convert())
        gaps[name] = np.abs(features(path, "tflite", x[40:], 1) - ref).mean()
    assert gaps["prepared"] < 0.7 * gaps["plain"], gaps
