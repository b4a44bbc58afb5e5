"""Keras 3 model -> TensorFlow SavedModel, the common source of the TFLite and ONNX conversions.

The serving signature takes ``image: float32[batch, S, S, 1]`` (batch left dynamic) and returns the
model's outputs: the softmax probabilities, and for models with a ``features`` layer also that feature map
(``export.cam.dual_output``; the runtime tells them apart by rank). Keras traces the model in inference
mode, so dropout is an identity and batch normalization uses its moving statistics; augmentation layers
are never part of the inference model (``train.fit`` only puts them in its training wrapper)."""
from __future__ import annotations

from pathlib import Path

AUGMENT_LAYERS = ("RandomRotation", "RandomZoom", "RandomTranslation", "RandomFlip", "RandomContrast",
                  "RandomCrop", "RandomBrightness")


def check_inference_model(model) -> None:
    """Refuse a model that still carries augmentation layers (the training wrapper, not the core)."""
    def walk(m):
        for layer in getattr(m, "layers", []):
            yield layer
            yield from walk(layer)

    bad = [f"{layer.name} ({type(layer).__name__})" for layer in walk(model)
           if type(layer).__name__ in AUGMENT_LAYERS]
    if bad:
        raise ValueError(f"model has augmentation layers, export the inference model: {', '.join(bad)}")


def save(model, out_dir: str | Path, size: int) -> Path:
    import tensorflow as tf

    check_inference_model(model)
    out_dir = Path(out_dir)
    spec = tf.TensorSpec([None, size, size, 1], tf.float32, name="image")
    model.export(str(out_dir), format="tf_saved_model", input_signature=[spec], verbose=False)
    return out_dir
