"""Training-time augmentation that compiles: one random affine warp per image (rotation, zoom, shift).

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
