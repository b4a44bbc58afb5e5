"""Heatmaps from the model pass itself: the exported network gets a second output, the last feature map
(the layer named ``features``, ``float32[N, h, w, C]``), next to its probabilities ``float32[N, 3]``, and
the bundle gets the dense head's weights, ``cam.npz`` (``weights`` ``[C, 3]``, ``bias`` ``[3]``).

The class-activation map for class k is ``relu(features @ weights[:, k])`` scaled to 0..1 (no
gradients). The card's ``"cam"`` entry says so:

    "cam": {"output": "features", "layer": "features", "feature_shape": [h, w, C],
            "method": "...", "weights": {"path": "cam.npz", "sha256": "...", "bytes": 15880}}

There is no separate feature model any more: the runtime tells the two outputs of ``model.tflite`` /
``model.onnx`` apart by rank (probabilities rank 2, last dim 3; features rank 4). Models without a
``features`` layer feeding a ``probs`` dense head (the baseline CNN) export with one output, as before.

*Fine features* (``fine``, ``python -m export.convert --fine-features LAYER``): for small inputs, whose last
map is only a few cells a side (5x5 at 144 px), the feature output can carry a finer map too: the last map
upsampled (nearest) onto ``LAYER``'s grid and cropped to it (with "same" padding a stride-16 cell lies in
stride-32 cell ``i // 2``), followed by ``LAYER``'s own channels: ``[N, hf, wf, C + Cf]``. The CAM reads the
first ``C`` channels (``cam.npz`` has ``C`` rows; card ``"cam_channels"``), so the heatmap is the same map on
the finer grid; the input gate (``train.ood``) reads all of them. Still one output, one pass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_edge.bundle import sha256_file

CAM_FILE = "cam.npz"
METHOD = "CAM: relu(features @ weights[:, class]), scaled to 0..1"


def has_features(model) -> bool:
    names = {layer.name for layer in model.layers}
    return "features" in names and "probs" in names


FINE_RULE = ("the last feature map upsampled (nearest) onto the fine layer's grid and cropped to it, then the "
             "fine layer's channels; the CAM reads the first cam_channels")


def feature_tensor(model, fine: str | None = None):
    """The symbolic feature output: the ``features`` layer's map, or with ``fine`` (the name of a layer with a
    finer map, e.g. Lite0's stride-16 ``block11_expand_relu``) that map upsampled onto ``fine``'s grid,
    cropped to it, and ``fine``'s channels after it."""
    from keras import layers

    last = model.get_layer("features").output
    if not fine:
        return last
    finer = model.get_layer(fine).output
    (h, w), (fh, fw) = tuple(last.shape[1:3]), tuple(finer.shape[1:3])
    if len(finer.shape) != 4 or fh < h or fw < w:
        raise ValueError(f"--fine-features {fine}: output {tuple(finer.shape)} is not a finer map than the "
                         f"features' {tuple(last.shape)}")
    fy, fx = -(-fh // h), -(-fw // w)
    up = layers.UpSampling2D((fy, fx), interpolation="nearest", name="features_up")(last)
    up = layers.Cropping2D(((0, h * fy - fh), (0, w * fx - fw)), name="features_crop")(up)
    return layers.Concatenate(axis=-1, name="features_fine")([up, finer])


def dual_output(model, fine: str | None = None):
    """``model`` with outputs ``{"probs": [N, 3], "features": [N, h, w, C]}`` (``feature_tensor``), sharing
    its layers and weights; ``model`` itself when it has no ``features`` layer."""
    import keras

    if not has_features(model):
        return model
    feats = feature_tensor(model, fine)
    return keras.Model(model.inputs, {"probs": model.outputs[0], "features": feats}, name=f"{model.name}_dual")


def keras_features(model, x: np.ndarray, fine: str | None = None) -> np.ndarray:
    """The float model's feature output (``feature_tensor``) on ``x`` (for parity checks)."""
    import keras

    sub = keras.Model(model.inputs, feature_tensor(model, fine))
    return sub.predict(x, batch_size=32, verbose=0)


def cam_maps(features: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """``float[N, h, w, C(+Cf)]`` feature maps -> ``float[N, h, w]`` maps for class ``k`` in 0..1, from the
    first ``C`` (``weights`` rows) channels (reference implementation for parity checks; the runtime has its
    own in ``cxr_edge.heatmap``)."""
    w = np.asarray(weights, np.float64)
    m = np.maximum(np.asarray(features, np.float64)[..., :w.shape[0]] @ w[:, k], 0.0)
    peak = m.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, m / np.where(peak > 0, peak, 1.0), 0.0)


def write_cam(model, bundle_dir: str | Path, fine: str | None = None) -> dict | None:
    """Write ``cam.npz`` into ``bundle_dir`` and return the card's ``"cam"`` entry (``None`` for models
    without a ``features`` layer); ``fine`` as for ``feature_tensor``."""
    if not has_features(model):
        return None
    path = Path(bundle_dir) / CAM_FILE
    weights, bias = model.get_layer("probs").get_weights()
    np.savez(path, weights=weights.astype(np.float32), bias=bias.astype(np.float32))
    shape = [int(d) for d in feature_tensor(model, fine).shape[1:]]
    entry = {"output": "features", "layer": "features", "feature_shape": shape, "cam_channels": int(len(weights)),
             "method": METHOD,
             "weights": {"path": CAM_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size}}
    if fine:
        entry["fine"] = {"layer": fine, "rule": FINE_RULE}
    return entry
