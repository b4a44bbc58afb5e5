"""Training-time augmentation that compiles: one random affine warp per image (rotation, zoom, shift), and
optionally a random exposure change per image (gamma, contrast, brightness: ``RandomPhotometric``).

Keras' RandomRotation / RandomZoom / RandomTranslation are marked as not XLA-compatible, so under JAX a
model that holds them runs its whole train step eagerly, op by op (about 41 s a step for Lite0 at batch 16
on this CPU). ``RandomAffine`` draws the same kinds of transform with ``keras.random`` and applies them with
``keras.ops.image.affine_transform`` (one bilinear warp, edge pixels repeated as ``fill_mode="nearest"``),
which every backend compiles. It is only active when called with ``training=True`` and only ever sits in
the trainer model, never in the exported inference graph.

The ranges are the report's: rotation up to 30 degrees either way, zoom up to 20% in or out, shift up to
10% of the side in each direction.
"""
from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="cxr_edge")
class RandomAffine(keras.layers.Layer):
    def __init__(self, rotation_deg: float = 30.0, zoom: float = 0.2, shift: float = 0.1,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rotation_deg, self.zoom, self.shift, self.seed = rotation_deg, zoom, shift, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_jit = True

    def transforms(self, n, height: int, width: int):
        """``[n, 8]`` projective transforms (output pixel -> input pixel), as ``affine_transform`` wants."""
        rot = math.radians(self.rotation_deg)
        theta = keras.random.uniform((n,), -rot, rot, seed=self.seed_generator)
        scale = keras.random.uniform((n,), 1.0 - self.zoom, 1.0 + self.zoom, seed=self.seed_generator)
        tx = keras.random.uniform((n,), -self.shift, self.shift, seed=self.seed_generator) * width
        ty = keras.random.uniform((n,), -self.shift, self.shift, seed=self.seed_generator) * height
        cos, sin = ops.cos(theta) * scale, ops.sin(theta) * scale
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        # input = centre + scale * R(theta) (output - centre) + shift
        a0, a1 = cos, -sin
        b0, b1 = sin, cos
        a2 = cx - a0 * cx - a1 * cy + tx
        b2 = cy - b0 * cx - b1 * cy + ty
        zeros = ops.zeros_like(theta)
        return ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)

    def call(self, images, training=None):
        if not training:
            return images
        shape = ops.shape(images)
        height, width = int(images.shape[1]), int(images.shape[2])
        t = self.transforms(shape[0], height, width)
        out = ops.image.affine_transform(images, t, interpolation="bilinear", fill_mode="nearest",
                                         data_format="channels_last")
        return ops.cast(out, images.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rotation_deg": self.rotation_deg, "zoom": self.zoom,
                "shift": self.shift, "seed": self.seed}


@keras.saving.register_keras_serializable(package="cxr_edge")
class RandomPhotometric(keras.layers.Layer):
    """A random exposure change per image, for scans taken and processed differently from the training
    ones: gamma in ``[1/(1+s), 1+s]`` (log-uniform), contrast about the image's own mean scaled by
    ``[1-s, 1+s]``, brightness shifted by up to ``s/4`` of the range. Works on the model input
    (``x = gray * scale + offset``, about ``[-1, 1]``), stays in that range, and compiles like
    ``RandomAffine``; only active with ``training=True``."""

    def __init__(self, strength: float = 0.3, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.strength, self.seed = strength, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_jit = True

    def call(self, images, training=None):
        if not training or not self.strength:
            return images
        n = ops.shape(images)[0]
        s = self.strength
        log_g = keras.random.uniform((n, 1, 1, 1), -math.log1p(s), math.log1p(s), seed=self.seed_generator)
        contrast = keras.random.uniform((n, 1, 1, 1), 1.0 - s, 1.0 + s, seed=self.seed_generator)
        shift = keras.random.uniform((n, 1, 1, 1), -s / 4, s / 4, seed=self.seed_generator)
        x = ops.cast(images, "float32")
        u = ops.clip((x + 1.0) / 2.0, 0.0, 1.0)
        u = ops.power(ops.maximum(u, 1e-6), ops.exp(log_g))
        mean = ops.mean(u, axis=(1, 2, 3), keepdims=True)
        u = ops.clip((u - mean) * contrast + mean + shift, 0.0, 1.0)
        return ops.cast(u * 2.0 - 1.0, images.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed}
