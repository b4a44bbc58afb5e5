"""Float weights for a Keras model from a shipped int8 TFLite model of the same architecture.

Runs and their float checkpoints stay out of git; a shipped bundle keeps only its int8 model. To fine-tune a
shipped model further (at another input size, say), its weights are read back from ``model.tflite``:

- each CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op's int8 weights times their per-channel scales, and
  its int32 bias times its scales;
- a first convolution whose gray-to-RGB repeat the export folded (``export.prequant``: one input channel)
  gets a third of the folded kernel on each of its three channels, the same function on gray input;
- the converter folded each batch norm into the convolution before it, so the Keras batch norm after that
  convolution is set to the identity (gamma 1, mean 0, variance ``1 - epsilon``) with the folded bias as its
  beta. ``BN(conv(x))`` then equals the folded convolution exactly.

Ops and Keras layers are matched in order (the converter keeps the graph's order) and every shape is
checked, so a bundle of another architecture is an error, not a silent mismatch. The result is a dict of
variable paths for ``train.models.assign``. Rounding to int8 stays in the weights (at most half a step per
channel); the first epochs of a fine-tune wash it out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from train.graph import GRAY_REPEAT, batch_norm_after

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _dequantized(interp, detail: dict) -> np.ndarray:
    raw = np.array(interp.get_tensor(detail["index"]))
    if not np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32)
    q = detail["quantization_parameters"]
    scales = np.asarray(q["scales"], np.float64)
    zero = np.asarray(q["zero_points"], np.float64)
    zero = zero if zero.size else np.zeros(1)
    if scales.size == 0:
        raise ValueError(f"tensor {detail['name']!r} is integer but has no quantization scales")
    if scales.size > 1:  # per channel, along quantized_dimension
        shape = [1] * raw.ndim
        shape[int(q["quantized_dimension"])] = scales.size
        scales = scales.reshape(shape)
        zero = zero.reshape(shape) if zero.size == scales.size else zero.reshape(-1)[:1]
    return ((raw.astype(np.float64) - zero) * scales).astype(np.float32)


def tflite_layers(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(op name, weights, bias)`` of every convolution and dense op of a TFLite model, in graph order, as
    float32 in TFLite's layouts (conv ``[out, kh, kw, in]``, depthwise ``[1, kh, kw, C]``, dense
    ``[out, in]``)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_path=str(path),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    details = {d["index"]: d for d in interp.get_tensor_details()}
    out = []
    for op in interp._get_ops_details():
        if op["op_name"] not in _CONV_OPS:
            continue
        ins = [i for i in op["inputs"] if i >= 0]
        if len(ins) != 3:
            raise ValueError(f"{path}: {op['op_name']} op {op['index']} has no bias input")
        out.append((op["op_name"], _dequantized(interp, details[ins[1]]), _dequantized(interp, details[ins[2]])))
    return out


def _reads_gray_repeat(layer) -> bool:
    source = getattr(layer.input, "_keras_history", (None,))[0]
    return source is not None and source.name == GRAY_REPEAT


def weights_from_tflite(model, path: Path) -> dict[str, np.ndarray]:
    """Variable path -> array for every convolution, its batch norm and the dense layer of the Keras
    ``model``, from the int8 TFLite model at ``path`` (see the module docstring)."""
    import keras

    convs = [layer for layer in model.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense))]
    ops = tflite_layers(Path(path))
    if len(ops) != len(convs):
        raise ValueError(f"{path} has {len(ops)} convolution/dense ops, the model {len(convs)} such layers")
    norm_after = batch_norm_after(model)  # a convolution's output -> the batch norm folded into it
    named: dict[str, np.ndarray] = {}
    for layer, (op, w, b) in zip(convs, ops):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = w[0][..., None]  # [kh, kw, C, 1]
        elif isinstance(layer, keras.layers.Conv2D):
            kernel = w.transpose(1, 2, 3, 0)  # [kh, kw, in, out]
            if kernel.shape[2] == 1 and layer.kernel.shape[2] == 3 and _reads_gray_repeat(layer):
                kernel = np.repeat(kernel / 3.0, 3, axis=2)  # export.prequant folded the gray repeat
        else:
            kernel = w.T  # [in, out]
        want = tuple(layer.kernel.shape)
        if kernel.shape != want:
            raise ValueError(f"{path}: {op} weights {w.shape} do not fit layer {layer.name} {want}")
        named[layer.kernel.path] = kernel
        bias = getattr(layer, "bias", None)
        bn = None if isinstance(layer, keras.layers.Dense) else norm_after.get(id(layer.output))
        if bn is None:
            if bias is None:
                raise ValueError(f"{path}: layer {layer.name} has neither a bias nor a batch norm to hold the "
                                 f"folded bias of {op}")
            named[bias.path] = b
            continue
        if bias is not None:  # the folded bias goes to the batch norm; the convolution's own is then zero
            named[bias.path] = np.zeros_like(b)
        channels = b.shape[0]
        named[bn.gamma.path] = np.ones(channels, np.float32)
        named[bn.beta.path] = b
        named[bn.moving_mean.path] = np.zeros(channels, np.float32)
        named[bn.moving_variance.path] = np.full(channels, 1.0 - bn.epsilon, np.float32)
    return named

