"""Out-of-distribution gate: refuse inputs that are not chest X-rays (photos, documents, screenshots) before
the model gives them a pneumonia label. It needs no model internals, so it works with any bundle.

Three checks, in order, on what ``cxr_edge.preprocess.load_gray_colour`` already produces:

1. **colour**: X-rays are gray. The share of pixels of a thumbnail of the original image whose chroma
   ``max(R,G,B) - min(R,G,B)`` exceeds ``CHROMA_LEVEL`` gray levels; above ``max_colour_fraction`` (card) the
   image is rejected. Gray JPEGs/PNGs/DICOMs cost nothing; RGB JPEGs with three equal channels pass.
2. **uniform**: a thumbnail with (almost) no contrast (a solid colour, a blank page) is rejected.
3. **appearance**: the ``uint8[S, S]`` gray image is averaged down to a ``T x T`` thumbnail (box filter),
   standardized per image (zero mean, unit variance: brightness/contrast do not matter), and scored under a
   probabilistic PCA model fitted on training chest X-rays (``train/ood.py``): the squared Mahalanobis distance
   in the first ``k`` principal components plus the squared reconstruction error divided by the mean
   variance of the discarded components. Scores above the card's ``threshold`` (a high quantile of the scores
   of patient-grouped validation images, never the official test) are rejected.

Bundle: ``ood.npz`` (arrays ``mean[D]``, ``components[k, D]``, ``eigvals[k]``, ``resid_var[]``) beside the
model files, and in ``card.json``::

    "ood": {"path": "ood.npz", "sha256": "...", "bytes": 1234, "threshold": 87.5, "thumb": 16,
            "max_colour_fraction": 0.02, "min_std": 2.0, "features": "...", "fitted_on": {...}}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from cxr_edge.bundle import BundleError, verified_file
from cxr_edge.preprocess import CHROMA_LEVEL, Source, load_gray_colour

DEFAULT_THUMB = 16
DEFAULT_MAX_COLOUR_FRACTION = 0.02
DEFAULT_MIN_STD = 2.0  # gray levels (0..255) of the thumbnail


def thumbnail(gray: np.ndarray, side: int = DEFAULT_THUMB) -> np.ndarray:
    """``uint8[S, S]`` (or ``[N, S, S]``) to ``float32[.., side, side]`` box-filter averages."""
    arr = np.asarray(gray)
    if arr.ndim == 3:
        return np.stack([thumbnail(a, side) for a in arr])
    s = arr.shape[0]
    if arr.shape == (s, s) and s % side == 0:
        f = s // side
        return arr.reshape(side, f, side, f).astype(np.float32).mean(axis=(1, 3))
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "L")
    return np.asarray(img.resize((side, side), Image.Resampling.BOX), dtype=np.float32)


def features(gray: np.ndarray, side: int = DEFAULT_THUMB) -> tuple[np.ndarray, np.ndarray]:
    """(standardized thumbnails ``float64[N, side*side]``, their standard deviations ``[N]`` in gray levels)."""
    t = thumbnail(gray if np.ndim(gray) == 3 else np.asarray(gray)[None], side).reshape(-1, side * side)
    t = t.astype(np.float64)
    mu = t.mean(axis=1, keepdims=True)
    sd = t.std(axis=1, keepdims=True)
    return (t - mu) / np.maximum(sd, 1e-6), sd[:, 0]


def ppca_score(x: np.ndarray, mean: np.ndarray, components: np.ndarray, eigvals: np.ndarray,
               resid_var: float) -> np.ndarray:
    """Squared Mahalanobis distance in the principal subspace + squared residual / ``resid_var``, per row."""
    c = x - mean
    z = c @ components.T
    resid = c - z @ components
    return (z * z / eigvals).sum(axis=1) + (resid * resid).sum(axis=1) / resid_var


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    score: float

    def __iter__(self):  # ok, reason, score = gate.check(...)
        return iter((self.ok, self.reason, self.score))


class Gate:
    """A fitted OOD gate. ``Gate.from_bundle(root, card)`` loads and verifies ``ood.npz``;
    ``check(gray, colour_fraction)`` -> ``(ok, reason, score)``; ``check_source(path)`` decodes first."""

    def __init__(self, arrays: dict, params: dict):
        self.mean = np.asarray(arrays["mean"], np.float64)
        self.components = np.asarray(arrays["components"], np.float64)
        self.eigvals = np.asarray(arrays["eigvals"], np.float64)
        self.resid_var = float(np.asarray(arrays["resid_var"]))
        self.params = dict(params)
        self.threshold = float(params["threshold"])
        self.thumb = int(params.get("thumb", DEFAULT_THUMB))
        self.max_colour_fraction = float(params.get("max_colour_fraction", DEFAULT_MAX_COLOUR_FRACTION))
        self.min_std = float(params.get("min_std", DEFAULT_MIN_STD))
        d = self.thumb * self.thumb
        if (self.mean.shape != (d,) or self.components.ndim != 2 or self.components.shape[1] != d
                or self.eigvals.shape != (self.components.shape[0],) or not np.all(self.eigvals > 0)
                or not self.resid_var > 0 or not np.isfinite(self.threshold)):
            raise ValueError("inconsistent OOD gate arrays/parameters")

    @classmethod
    def from_bundle(cls, root: Path, card: dict, verify: bool = True) -> Optional["Gate"]:
        """The bundle's gate, or ``None`` when its card has no ``"ood"``. Raises :class:`BundleError` for a
        missing, corrupt (sha256 mismatch) or malformed gate."""
        params = card.get("ood")
        if params is None:
            return None
        root = Path(root)
        try:
            path = verified_file(root, params, "OOD gate file", verify)
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in ("mean", "components", "eigvals", "resid_var")}
            return cls(arrays, params)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"bundle {root}: unusable OOD gate ({type(exc).__name__}: {exc})") from None

    def scores(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(appearance scores, thumbnail standard deviations) for ``uint8[N, S, S]``."""
        x, sd = features(gray, self.thumb)
        return ppca_score(x, self.mean, self.components, self.eigvals, self.resid_var), sd

    def check(self, gray: np.ndarray, colour_fraction: float = 0.0) -> Verdict:
        """Verdict for one ``uint8[S, S]`` image (from ``load_gray``) and its chroma fraction."""
        if colour_fraction > self.max_colour_fraction:
            return Verdict(False, f"colour image ({colour_fraction:.0%} of pixels in colour; X-rays are gray)",
                           float("inf"))
        score, sd = self.scores(np.asarray(gray)[None])
        score, sd = float(score[0]), float(sd[0])
        if sd < self.min_std:
            return Verdict(False, "uniform image (no contrast; not an X-ray)", float("inf"))
        if not score <= self.threshold:
            return Verdict(False, f"does not look like a chest X-ray (OOD score {score:.1f} > "
                                  f"threshold {self.threshold:.1f})", score)
        return Verdict(True, "", score)

    def check_source(self, source: Source, size: int = 224) -> Verdict:
        """Decode ``source`` (``cxr_edge.preprocess.load_gray_colour``) and check it."""
        gray, colour = load_gray_colour(source, size)
        return self.check(gray, colour)


__all__ = ["Gate", "Verdict", "features", "thumbnail", "ppca_score", "CHROMA_LEVEL"]
