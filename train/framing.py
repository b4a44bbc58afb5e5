"""The framing shortcut, and the augmentation that takes it away.

Kermany's normal training films show more of the child than its pneumonia films: neck, shoulders and upper
abdomen around the chest (``MANIFEST.csv``: normal originals have a median height of 1,341 px, pneumonia
ones 766-808 px; the pneumonia films are cropped close to the thorax). A model can tell normal from
pneumonia partly by how much of the frame the chest fills, and the models trained here do: cropping the
validation scans to the middle 70% of each side (``python -m train.framing MODEL``) takes the shipped
model's normal recall from 1.000 to about 0.4 while its pneumonia recall stays where it was. A clinic's
films are framed however its radiographer framed them.

``RandomFraming`` removes the cue from training: each time a training image is drawn it is cropped to a
random window (a fraction ``keep`` of each side, drawn from ``[low, 1]`` whatever the class, placed at
random) and brought to the input size, so a tightly framed normal chest is as common as a tightly framed
pneumonia one. The window is cut from the image at the resolution the files hold (224 px) before the
resize, not from the model-size image scaled back up: a model taught on such blurred crops learns to tell
them from real tight films and goes on reading the framing of sharp ones (the first run did: normal recall
0.86 on blurred middle-70% crops, 0.41 on sharp ones). ``framed_copies`` does the same to the validation split with fixed draws (what a run under
``framing`` validates on with ``val_neutral_*``, together with ``train.aspect``'s ratios).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

KEEPS = (1.0, 0.9, 0.8, 0.7)  # the fractions of each side that ``python -m train.framing`` keeps
STORED = 224  # Kermany's train/ (and so the validation split) is stored 224 px square (data README)


def frame_to(gray: np.ndarray, keep, where_y, where_x, size: int) -> np.ndarray:
    """Each image of ``gray`` (``uint8[N, H, W]``, at the resolution the files hold) cropped to a window of
    ``keep`` times its height and width (per image, ``0 < keep <= 1``) and brought to ``size`` by
    ``cxr_edge.preprocess.load_gray``: the crop is made before the resize, so a tight window stays as sharp
    as a film framed that tightly would be (cropping the model-size image and scaling it back up would
    blur it, and a model learns to tell the blur). ``where_y`` / ``where_x`` in ``[0, 1]`` place the
    window: 0 at the top / left edge, 0.5 centred, 1 at the bottom / right."""
    from PIL import Image

    from cxr_edge.preprocess import load_gray

    gray = np.asarray(gray)
    n, h, w = gray.shape[:3]
    keep, wy, wx = (np.broadcast_to(np.asarray(v, np.float64), (n,)) for v in (keep, where_y, where_x))
    if np.any(keep <= 0) or np.any(keep > 1):
        raise ValueError("keep must be in (0, 1]")
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        kh, kw = max(1, round(h * keep[i])), max(1, round(w * keep[i]))
        top, left = round(wy[i] * (h - kh)), round(wx[i] * (w - kw))
        out[i] = load_gray(Image.fromarray(gray[i, top:top + kh, left:left + kw]), size)
    return out


class RandomFraming:
    """``transform(x, idx, rng)`` for ``train.batches.FixedBatches``: every image (``uint8[N, H, W]`` at
    the files' resolution) cropped to a window of ``keep ~ U[low, 1]`` of each side at a random place,
    whatever its class, and brought to the model's input (``spec``: size, scale and offset). ``full``: the
    share of images left whole instead (the model still sees films as most are framed)."""

    def __init__(self, low: float, spec, full: float = 0.0):
        if not 0 < low < 1:
            raise ValueError(f"framing: the smallest kept fraction must be in (0, 1), not {low}")
        if not 0 <= full < 1:
            raise ValueError(f"framing_full: the share of whole frames must be in [0, 1), not {full}")
        self.low, self.spec, self.full = float(low), spec, float(full)

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``keep, where_y, where_x`` for ``n`` images: ``keep ~ U[low, 1]``, or 1 (the whole frame) for a
        share ``full`` of them drawn at random."""
        keep, wy, wx = rng.uniform(self.low, 1.0, n), rng.uniform(0, 1, n), rng.uniform(0, 1, n)
        if self.full:
            keep = np.where(rng.uniform(0, 1, n) < self.full, 1.0, keep)
        return keep, wy, wx

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from cxr_edge.preprocess import to_input

        return to_input(frame_to(x, *self.draw(len(x), rng), self.spec.size), self.spec)

    def __call__(self, x: np.ndarray, idx, rng: np.random.Generator) -> np.ndarray:
        return self.apply(x, rng)


def chain(*transforms):
    """One ``transform(x, idx, rng)`` applying each of ``transforms`` (``None`` skipped) in turn; ``None``
    when there is none."""
    fns = [t for t in transforms if t is not None]
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]

    def run(x, idx, rng):
        for f in fns:
            x = f(x, idx, rng)
        return x

    return run


def framed_copies(framing: RandomFraming, x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The model inputs of ``x`` (``uint8[N, H, W]`` at the files' resolution) with one fixed framing draw
    per image (seeded): validation as films framed regardless of class would come."""
    return framing.apply(x, np.random.default_rng(seed + 7919))


def framing_accuracy(predict, images: np.ndarray, labels: np.ndarray, size: int, keeps=KEEPS) -> dict:
    """Accuracy and per-class recall with each scan cropped to its middle ``keep`` of each side, for each
    ``keep``. ``images``: ``uint8[N, H, W]`` scans at their stored size; each crop goes through
    ``cxr_edge.preprocess.load_gray`` to ``size`` (``frame_to``), ``predict(gray[N, S, S])
    -> probs``. A model that reads the lungs moves little; one that reads the framing loses normals."""
    from train.aspect import accuracy_and_recall

    return {f"keep_{keep:g}": accuracy_and_recall(predict(frame_to(images, keep, 0.5, 0.5, size)), labels)
            for keep in keeps}


def main(argv=None) -> int:
    """``python -m train.framing MODEL [MODEL ...]``: each model (a bundle, int8 through ``Classifier``, or
    a run folder, float Keras) on the validation split of its run, with the scans cropped to their middle
    100 / 90 / 80 / 70% of each side."""
    import json

    from train import data as data_mod
    from train.aspect import _predictor, model_args

    args, root = model_args("python -m train.framing", main.__doc__, argv)
    for model in args.models:
        predict, size, cfg, engine = _predictor(Path(model), args.backend)
        val = data_mod.run_splits(root, cfg)["val"]
        stored = data_mod.load_images(val, STORED)  # the files' own pixels: they are 224 px already
        res = framing_accuracy(predict, stored, data_mod.labels_of(val), size)
        print(json.dumps({"model": str(model), "engine": engine, **res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
