"""Intensity normalisation of the model's gray image, the step between ``load_gray`` and the scaling in
``cxr_edge.preprocess.to_input``. A model card names it (``input.intensity``); cards without it mean ``none``.

- ``none``: the gray levels as decoded (every model shipped so far).
- ``equalize``: global histogram equalisation of each image: gray level ``v`` becomes
  ``round(255 * (cdf(v) - cdf_min) / (n - cdf_min))``, where ``cdf`` counts the image's pixels at or below a
  level, ``cdf_min`` is the count at its darkest level and ``n`` its pixel count (an image of one level stays
  as it is). Any monotone change of exposure (gamma, contrast, brightness, a detector's other response curve)
  maps a film to nearly the same output, so a model trained on it cannot lean on how a clinic exposes films.

Pure numpy on ``uint8``: training, export calibration and the runtime all reach it through ``to_input``.
"""
from __future__ import annotations

import numpy as np

INTENSITIES = ("none", "equalize")


def check(how: str) -> str:
    if how not in INTENSITIES:
        raise ValueError(f"unknown intensity normalisation {how!r}: this runtime knows {', '.join(INTENSITIES)}")
    return how


def equalize(gray: np.ndarray) -> np.ndarray:
    """``uint8[..., H, W]`` histogram-equalised image by image (see the module docstring)."""
    arr = np.asarray(gray)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    flat = arr.reshape(-1, arr.shape[-2] * arr.shape[-1])
    out = np.empty_like(flat)
    n = flat.shape[1]
    for i, img in enumerate(flat):
        cdf = np.cumsum(np.bincount(img, minlength=256))
        low = cdf[img.min()]
        if low == n:  # one level: nothing to spread
            out[i] = img
            continue
        lut = np.rint(255.0 * np.maximum(cdf - low, 0) / (n - low)).astype(np.uint8)
        out[i] = lut[img]
    return out.reshape(arr.shape)


def normalise(gray: np.ndarray, how: str) -> np.ndarray:
    """``gray`` under ``how`` (one of ``INTENSITIES``)."""
    if check(how) == "equalize":
        return equalize(gray)
    return gray
