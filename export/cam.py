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


def dual_output(model):
    """``model`` with outputs ``{"probs": [N, 3], "features": [N, h, w, C]}``, sharing its layers and
    weights; ``model`` itself when it has no ``features`` layer."""
    import keras

    if not has_features(model):
        return model
    feats = model.get_layer("features").output
    return keras.Model(model.inputs, {"probs": model.outputs[0], "features": feats}, name=f"{model.name}_dual")


def keras_features(model, x: np.ndarray) -> np.ndarray:
    """The float model's feature map on ``x`` (for parity checks)."""
    import keras

    sub = keras.Model(model.inputs, model.get_layer("features").output)
    return sub.predict(x, batch_size=32, verbose=0)


def cam_maps(features: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """``float[N, h, w, C]`` feature maps -> ``float[N, h, w]`` maps for class ``k`` in 0..1 (reference
    implementation for parity checks; the runtime has its own in ``cxr_edge.heatmap``)."""
    m = np.maximum(np.asarray(features, np.float64) @ np.asarray(weights, np.float64)[:, k], 0.0)
    peak = m.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, m / np.where(peak > 0, peak, 1.0), 0.0)


def write_cam(model, bundle_dir: str | Path) -> dict | None:
    """Write ``cam.npz`` into ``bundle_dir`` and return the card's ``"cam"`` entry (``None`` for models
    without a ``features`` layer)."""
    if not has_features(model):
        return None
    path = Path(bundle_dir) / CAM_FILE
    weights, bias = model.get_layer("probs").get_weights()
    np.savez(path, weights=weights.astype(np.float32), bias=bias.astype(np.float32))
    shape = [int(d) for d in model.get_layer("features").output.shape[1:]]
    return {"output": "features", "layer": "features", "feature_shape": shape, "method": METHOD,
            "weights": {"path": CAM_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size}}
