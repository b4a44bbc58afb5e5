"""Float-exact and near-exact rewrites of a Keras model that make its int8 conversion more faithful.

Both act on the SavedModel the int8 converters read; the float artifacts, the float reference and the
class-activation weights stay those of the model as trained.

``fold_gray_input``: backbones pretrained on RGB take the one gray channel three times (``train.models``:
the ``gray_to_rgb`` layer). On a gray image ``conv([x, x, x], K)`` equals ``conv(x, K_r + K_g + K_b)``
exactly, but an int8 converter quantizes the three RGB kernels separately: filters that compare colours
(large weights of opposite sign that cancel on gray input) keep rounding errors that do not cancel.
The folded model takes the one channel into its first convolution: the same function in float.

``bias_correct``: per-channel int8 rounding of a convolution's kernel shifts each output channel's mean
by ``sum((W_q - W) * E[x])`` (``W`` the kernel with its batch norm folded in, as the converters fold it;
``E[x]`` the mean of the layer's float input over calibration images). Channels that read a large,
nearly constant input through a large kernel carry a systematic error of several quantization steps.
The rewrite subtracts that shift from the bias (the batch norm's beta, or the convolution's own bias), so
the int8 kernel plus the corrected bias lands where the float kernel plus the original bias did (empirical
bias correction, Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"). It predicts the converters' weight rounding: symmetric, one scale per output channel,
``max|W| / 127`` (TFLite's CONV_2D / DEPTHWISE_CONV_2D and onnxruntime's S8 per-channel weights).
"""
from __future__ import annotations

import numpy as np

from train.lite import int8_per_channel
from train.models import GRAY_REPEAT as REPEAT_LAYER
from train.models import batch_norm_after


def _consumers(model, layer) -> list:
    out = []
    for other in model.layers:
        if other is not layer and any(getattr(t, "_keras_history", (None,))[0] is layer
                                      for node in other._inbound_nodes for t in node.input_tensors):
            out.append(other)
    return out


def foldable(model) -> bool:
    """True when ``model``'s ``gray_to_rgb`` layer repeats one tensor and only top-level ``Conv2D`` layers
    read it."""
    import keras

    try:
        rep = model.get_layer(REPEAT_LAYER)
    except ValueError:
        return False
    sources = {id(t) for node in rep._inbound_nodes for t in node.input_tensors}
    users = _consumers(model, rep)
    return len(sources) == 1 and bool(users) and all(type(u) is keras.layers.Conv2D for u in users)


def fold_gray_input(model):
    """A copy of ``model`` without ``gray_to_rgb``, the convolutions that read it taking one channel
    (their kernels summed over the input channels); ``model`` itself when it cannot be folded."""
    import keras

    if not foldable(model):
        return model
    users = {u.name for u in _consumers(model, model.get_layer(REPEAT_LAYER))}

    def call(layer, *args, **kwargs):
        if layer.name == REPEAT_LAYER:
            return args[0][0]  # the gray input, once
        return layer(*args, **kwargs)

    folded = keras.models.clone_model(model, call_function=call)
    for new in folded.layers:
        if new.name == REPEAT_LAYER or not new.weights:
            continue
        weights = model.get_layer(new.name).get_weights()
        if new.name in users:
            weights[0] = weights[0].sum(axis=2, keepdims=True)
        new.set_weights(weights)
    return folded


def _int8_error(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """``W_q - W`` for per-output-channel symmetric int8 rounding (the last axis, or the channel axis of a
    depthwise kernel ``[kh, kw, C, 1]``)."""
    w = kernel[..., 0] if depthwise else kernel
    q, scale = int8_per_channel(w)
    err = q * scale - w
    return err[..., None] if depthwise else err


def bias_correct(model, x: np.ndarray, batch: int = 25):
    """A copy of ``model`` whose convolution biases cancel the mean shift of int8 kernel rounding, the
    input means measured on ``x`` (calibration images, float32[N, S, S, 1]). Returns ``(model, layers
    corrected)``. Convolutions with a depth multiplier above 1, or with neither a batch norm after them
    nor a bias, are left alone."""
    import keras

    convs = []
    norms = {k: bn for k, bn in batch_norm_after(model).items() if bn.center}
    for layer in model.layers:
        if type(layer) is keras.layers.DepthwiseConv2D and layer.depth_multiplier != 1:
            continue
        if type(layer) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D) and (
                id(layer.output) in norms or layer.use_bias):
            convs.append(layer)
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    if not convs:
        return twin, 0
    probe = keras.Model(model.inputs, [c.input for c in convs])
    means = [np.zeros(c.input.shape[-1], np.float64) for c in convs]
    for i in range(0, len(x), batch):
        outs = probe([np.asarray(x[i:i + batch], np.float32)], training=False)
        for m, o in zip(means, outs if isinstance(outs, (list, tuple)) else [outs]):
            m += np.asarray(o, np.float64).mean(axis=(1, 2)).sum(axis=0) / len(x)
    for conv, mean_in in zip(convs, means):
        depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
        kernel = conv.get_weights()[0]
        bn = norms.get(id(conv.output))
        if bn is not None:
            gamma = bn.gamma.numpy() if bn.scale else np.ones(kernel.shape[2 if depthwise else -1])
            kernel = kernel * (gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)).reshape(
                (1, 1, -1, 1) if depthwise else (1,) * (kernel.ndim - 1) + (-1,))
        err = _int8_error(kernel, depthwise)
        shift = (err[..., 0].sum(axis=(0, 1)) * mean_in if depthwise
                 else np.einsum("hwio,i->o", err, mean_in))
        target = twin.get_layer(bn.name).beta if bn is not None else twin.get_layer(conv.name).bias
        target.assign(np.asarray(target.numpy() - shift, np.float32))
    return twin, len(convs)
