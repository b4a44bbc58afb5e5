"""Class-activation-map artifacts for a bundle: the feature extractor up to the layer ``features`` as a
float16 TFLite model, and the dense head's weights (``cxr_edge.heatmap`` reads both)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from cxr_edge.bundle import CARD_NAME, sha256_file
from export import savedmodel, tflite


def add_cam(model, size: int, bundle_dir: str | Path) -> dict | None:
    """Write ``features.tflite`` + ``cam.npz`` into ``bundle_dir`` and a ``"cam"`` entry into its card.
    Returns the entry, or ``None`` for models without a ``features`` layer (the baseline CNN)."""
    import keras

    names = {layer.name for layer in model.layers}
    if "features" not in names or "probs" not in names:
        return None
    bundle_dir = Path(bundle_dir)
    features = keras.Model(model.inputs, model.get_layer("features").output, name="cam_features")
    weights, bias = model.get_layer("probs").get_weights()
    with tempfile.TemporaryDirectory(prefix="cxr-cam-") as tmp:
        saved = savedmodel.save(features, Path(tmp) / "saved_model", size)
        tflite.convert(saved, bundle_dir / "features.tflite", "float16")
    np.savez(bundle_dir / "cam.npz", weights=weights.astype(np.float32), bias=bias.astype(np.float32))
    entry = {"path": "features.tflite", "sha256": sha256_file(bundle_dir / "features.tflite"),
             "bytes": (bundle_dir / "features.tflite").stat().st_size, "precision": "float16",
             "layer": "features", "method": "CAM: relu(features @ weights[:, class]), scaled to 0..1",
             "weights": {"path": "cam.npz", "sha256": sha256_file(bundle_dir / "cam.npz")}}
    card = json.loads((bundle_dir / CARD_NAME).read_text())
    card["cam"] = entry
    (bundle_dir / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return entry
