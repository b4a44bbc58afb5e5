"""Graph helpers shared by the model builders (``train.models``) and the readers of a model's weights
(``train.unfold``, ``export.prequant``): the gray-to-RGB repeat layer's name and the batch norm that follows
each convolution."""
from __future__ import annotations

GRAY_REPEAT = "gray_to_rgb"  # the layer that repeats the gray channel for RGB backbones


def batch_norm_after(model) -> dict:
    """``id(tensor) -> BatchNormalization layer`` reading that tensor, for the top-level layers of
    ``model``: the batch norm after a convolution is ``batch_norm_after(model).get(id(conv.output))``
    (the one a converter folds into it)."""
    import keras

    return {id(layer.input): layer for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)}
