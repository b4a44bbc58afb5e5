"""Intensity normalisation of the model's gray image, the step between ``load_gray`` and the scaling in
``cxr_edge.preprocess.to_input``. A model card names it (``input.intensity``); cards without it mean ``none``.

- ``none``: the gray levels as decoded (every model shipped so far).
- ``equalize``: global histogram equalisation of each image: gray level ``v`` becomes
  ``round(255 * (cdf(v) - cdf_min) / (n - cdf_min))``, where ``cdf`` counts the image's pixels at or below a
  level, ``cdf_min`` is the count at its darkest level and ``n`` its pixel count (an image of one level stays
  as it is). Any monotone change of exposure (gamma, contrast, brightness, a detector's other response curve)
  maps a film to nearly the same output, so a model trained on it cannot lean on how a clinic exposes films.
  It also stretches the few levels of a flat region (the dark background) over many, and sensor noise with it.
- ``equalize_clip``: the same with each level's count first clipped at ``CLIP`` times the even share of the
  image's own range of levels, the excess spread evenly over that range (global contrast-limited equalisation):
  no range of levels is stretched more than about ``CLIP`` times, so noise in flat regions grows far less.

Pure numpy on ``uint8``: training, export calibration and the runtime all reach it through ``to_input``.
"""
from __future__ import annotations

import numpy as np

INTENSITIES = ("none", "equalize", "equalize_clip")
CLIP = 2.5  # at most 2.5 times the even share per level (1% of the pixels over 256 levels: skimage's default)


def check(how: str) -> str:
    if how not in INTENSITIES:
        raise ValueError(f"unknown intensity {how!r} in the model's input: this runtime knows {', '.join(INTENSITIES)}")
    return how


def equalize(gray: np.ndarray, clip: float | None = None) -> np.ndarray:
    """``uint8[..., H, W]`` histogram-equalised image by image (see the module docstring); ``clip``: each
    level's count at most ``clip`` times the even share of the image's range of levels first."""
    arr = np.asarray(gray)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    flat = arr.reshape(-1, arr.shape[-2] * arr.shape[-1])
    out = np.empty_like(flat)
    for i, img in enumerate(flat):
        lo, hi = int(img.min()), int(img.max())
        if lo == hi:  # one level: nothing to spread
            out[i] = img
            continue
        hist = np.bincount(img, minlength=256)[lo:hi + 1].astype(np.float64)
        if clip is not None:
            limit = clip * img.size / len(hist)
            excess = np.maximum(hist - limit, 0.0).sum()
            hist = np.minimum(hist, limit) + excess / len(hist)
        cdf = np.cumsum(hist)
        lut = np.zeros(256, np.uint8)
        lut[lo:hi + 1] = np.rint(255.0 * (cdf - cdf[0]) / (cdf[-1] - cdf[0]))
        out[i] = lut[img]
    return out.reshape(arr.shape)


def normalise(gray: np.ndarray, how: str) -> np.ndarray:
    """``gray`` under ``how`` (one of ``INTENSITIES``)."""
    how = check(how)
    if how == "none":
        return gray
    return equalize(gray, CLIP if how == "equalize_clip" else None)
