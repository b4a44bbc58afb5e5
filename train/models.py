"""Model registry: one builder per architecture. Every model takes the grayscale input of
``cxr_edge.preprocess`` (``float32[N, S, S, 1]``, scaled as its ``InputSpec`` says) and ends in a
3-way softmax in ``cxr_edge.labels.CLASS_NAMES`` order. Backbones that want RGB repeat the channel.

Pretrained backbones end in global average pooling + dropout + dense, so the last feature map is a
class-activation map source (layer ``features``)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cxr_edge.intensity import check
from cxr_edge.preprocess import InputSpec
from train import lite
from train.graph import GRAY_REPEAT, batch_norm_after  # noqa: F401  (batch_norm_after: importable here too)

N_CLASSES = 3


@dataclass(frozen=True)
class Built:
    model: object  # keras.Model, inference graph (no augmentation)
    spec: InputSpec
    pretrained: str  # what the weights started from, said in every result


def _gray_input(size: int, rgb: bool):
    from keras import layers

    inp = layers.Input((size, size, 1), name="image")
    x = layers.Concatenate(name=GRAY_REPEAT)([inp, inp, inp]) if rgb else inp
    return inp, x


def _head(features, dropout: float):
    from keras import layers

    x = layers.GlobalAveragePooling2D(name="gap")(features)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return layers.Dense(N_CLASSES, activation="softmax", dtype="float32", name="probs")(x)


def baseline(input_size: int = 128, batchnorm: bool = False, dropout: float = 0.0, **_) -> Built:
    """The report's 2-conv CNN, exactly (RGB input as in the report: 1,848,547 parameters at 128 px)."""
    import keras
    from keras import layers

    inp, x = _gray_input(input_size, rgb=True)
    for i, filters in enumerate((16, 32)):
        x = layers.Conv2D(filters, 3, name=f"conv{i}")(x)
        if batchnorm:
            x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="fc")(x)
    if dropout:
        x = layers.Dropout(dropout, name="fc_dropout")(x)
    out = layers.Dense(N_CLASSES, activation="softmax", dtype="float32", name="probs")(x)
    return Built(keras.Model(inp, out, name="baseline"), InputSpec(input_size, 1 / 255.0, 0.0), "none")


def densenet201(input_size: int = 224, weights: str | None = None, dropout: float = 0.2, **_) -> Built:
    """``keras.applications.DenseNet201`` + GAP + dropout + dense. ``weights``: None, "imagenet" (needs
    internet the first time) or a local ``.h5`` file of the no-top ImageNet weights."""
    import keras
    from keras import layers

    inp, x = _gray_input(input_size, rgb=True)
    base = keras.applications.DenseNet201(include_top=False, weights=weights,
                                          input_shape=(input_size, input_size, 3))
    features = layers.Activation("linear", name="features")(base(x))
    model = keras.Model(inp, _head(features, dropout), name="cxr_densenet201")
    # keras "torch" preprocessing on gray: (x/255 - mean) / std with ImageNet's mean/std averaged over RGB
    spec = InputSpec(input_size, 1.0 / (255.0 * 0.226), -0.449 / 0.226)
    return Built(model, spec, weights or "none")


def _efficientnet_lite(variant: str, input_size: int, weights: str | None, dropout: float) -> Built:
    import keras
    from keras import layers

    inp, x = _gray_input(input_size, rgb=True)
    features = layers.Activation("linear", name="features")(lite.backbone(variant, x))
    model = keras.Model(inp, _head(features, dropout), name=f"cxr_efficientnet_{variant}")
    if weights == "imagenet":
        assign(model, lite.imagenet_weights(variant), strict=False)
    elif weights and Path(weights).is_dir():  # a shipped bundle: its int8 model's weights, read back
        from cxr_edge.bundle import load_bundle
        from train.unfold import weights_from_tflite

        tflite_file, _ = load_bundle(weights).model_file("tflite")  # as the card lists it, sha256 checked
        assign(model, weights_from_tflite(model, tflite_file))
    elif weights:
        assign(model, load_named(weights), strict=False)
    return Built(model, InputSpec(input_size, lite.SCALE, lite.OFFSET), weights or "none")


def efficientnet_lite0(input_size: int = 224, weights: str | None = None, dropout: float = 0.2, **_):
    return _efficientnet_lite("lite0", input_size, weights, dropout)


def efficientnet_lite1(input_size: int = 224, weights: str | None = None, dropout: float = 0.2, **_):
    return _efficientnet_lite("lite1", input_size, weights, dropout)


def efficientnet_lite2(input_size: int = 224, weights: str | None = None, dropout: float = 0.3, **_):
    return _efficientnet_lite("lite2", input_size, weights, dropout)


REGISTRY: dict[str, Callable[..., Built]] = {
    "baseline": baseline,
    "densenet201": densenet201,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite1": efficientnet_lite1,
    "efficientnet_lite2": efficientnet_lite2,
}


def build(name: str, intensity: str = "none", **kwargs) -> Built:
    """``name``'s model; ``intensity``: the input's normalisation (``cxr_edge.intensity``), recorded in its spec."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(REGISTRY)}")
    built = REGISTRY[name](**kwargs)
    return dataclasses.replace(built, spec=dataclasses.replace(built.spec, intensity=check(intensity)))


# ---- weights by variable path, portable across backends ---------------------------------------------

def named_weights(model) -> dict:
    import numpy as np

    return {v.path: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in model.weights}


def assign(model, weights: dict, strict: bool = True) -> int:
    """Set variables from ``{variable path: array}``; returns how many were set."""
    n = 0
    for v in model.weights:
        if v.path in weights:
            arr = weights[v.path]
            if tuple(arr.shape) != tuple(v.shape):
                raise ValueError(f"{v.path}: shape {arr.shape} != {tuple(v.shape)}")
            v.assign(arr.astype("float32"))
            n += 1
        elif strict:
            raise KeyError(f"no weights for {v.path}")
    if n == 0:
        raise ValueError("none of the given weights match this model")
    return n


def save_named(weights: dict, path: str, compact: bool = False, max_bytes: int = 15 * 2**20) -> list[str]:
    """Save ``{path: array}`` as one or more ``.npz`` parts of at most ``max_bytes`` each (the GPU lease
    returns files of 16 MiB at most). ``compact`` stores arrays of 2+ dimensions in float16, keeping
    1-D ones (biases, batch-norm statistics) in float32."""
    import numpy as np

    parts, cur, size = [], {}, 0
    for k, arr in weights.items():
        a = arr.astype(np.float16) if compact and arr.ndim >= 2 else arr.astype(np.float32)
        if cur and size + a.nbytes > max_bytes:
            parts.append(cur)
            cur, size = {}, 0
        cur[k] = a
        size += a.nbytes
    parts.append(cur)
    stem = str(path).removesuffix(".npz")
    names = []
    for i, part in enumerate(parts):
        name = f"{stem}.npz" if len(parts) == 1 else f"{stem}.part{i}.npz"
        with open(f"{name}.tmp", "wb") as f:  # atomic: a run killed mid-write keeps its last weights
            np.savez(f, **part)
        os.replace(f"{name}.tmp", name)
        names.append(name)
    return names


def load_named(path: str) -> dict:
    """Read what ``save_named`` wrote (``X.npz`` or ``X.part0.npz``, ``X.part1.npz``, ...)."""
    import glob

    import numpy as np

    stem = str(path).removesuffix(".npz")
    files = [f"{stem}.npz"] if os.path.exists(f"{stem}.npz") else sorted(
        glob.glob(f"{stem}.part*.npz"), key=lambda s: int(s.rsplit("part", 1)[1].split(".")[0]))
    if not files:
        raise FileNotFoundError(f"no weights at {stem}.npz or {stem}.part*.npz")
    out = {}
    for f in files:
        with np.load(f) as z:
            out.update({k: z[k].astype(np.float32) for k in z.files})
    return out
