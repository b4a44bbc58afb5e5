"""Class activation maps (CAM) for models that end in global average pooling + dense.

A bundle whose card has a ``"cam"`` entry ships the classifier's dense weights (``cam.npz``: ``weights``
``[C, 3]``, ``bias`` ``[3]``, sha256-verified like the model files). The map for class k is
``relu(features @ weights[:, k])``, scaled to 0..1: no gradients needed. ``features`` (``[h, w, C]``) is the
model's second output (``Engine.run_full``), so a label with its heatmap costs one network pass:
``Classifier(heatmaps=True)`` puts the map of the predicted class on each :class:`cxr_edge.Result`
(``result.heatmap``). Older bundles carry a separate feature model instead (card ``"cam": {"path":
"features.tflite", ...}``); it is still read, at the cost of a second pass.

Overlay files written by ``cxr-edge classify --heatmap DIR`` are named by :func:`heatmap_path`:
``<file stem>-<first 8 hex digits of the sha256 of the input's resolved absolute path>.heatmap.png``, so
that ``a/x.jpeg`` and ``b/x.jpeg`` never collide and the same input always gets the same name.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from cxr_edge.bundle import Bundle, BundleError, verified_file
from cxr_edge.engines import _dequantize, load_tflite_interpreter

MAX_SIDE = 1024  # overlays are written at most this large


def cam_maps(features: np.ndarray, weights: np.ndarray, classes) -> np.ndarray:
    """``float[N, h, w, C]`` feature maps and a class index per row -> ``float32[N, h, w]`` in 0..1. A feature
    output with more channels than ``weights`` has rows (a *fine* one: the last map on a finer grid, then a
    finer map for the input gate; card ``cam.cam_channels``) gives its first ``C`` channels to the map."""
    f = np.asarray(features, np.float32)
    w = np.asarray(weights, np.float32)
    if f.shape[-1] < w.shape[0]:
        raise ValueError(f"feature maps with {f.shape[-1]} channels, CAM weights for {w.shape[0]}")
    f = f[..., :w.shape[0]]
    k = np.broadcast_to(np.asarray(classes, int), (len(f),))
    m = np.maximum(np.einsum("nhwc,nc->nhw", f, w[:, k].T), 0.0)
    peak = m.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, m / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def cam_entry(bundle: Bundle) -> dict:
    entry = bundle.card.get("cam")
    if not isinstance(entry, dict) or not isinstance(entry.get("weights"), dict):
        raise BundleError(f"bundle {bundle.root} has no class-activation data (card entry 'cam')")
    return entry


def load_cam_weights(bundle: Bundle) -> np.ndarray:
    """The dense head's ``weights[C, 3]`` from the bundle's verified ``cam.npz``."""
    path = verified_file(bundle.root, cam_entry(bundle)["weights"], "CAM weights")
    try:
        with np.load(path, allow_pickle=False) as z:
            weights = np.asarray(z["weights"], np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"bundle {bundle.root}: unreadable CAM weights ({exc})") from None
    if weights.ndim != 2 or weights.shape[1] != 3:
        raise BundleError(f"bundle {bundle.root}: CAM weights have shape {weights.shape}, not [C, 3]")
    return weights


class LegacyFeatures:
    """The separate feature model of older bundles (card ``"cam": {"path": "features.tflite"}``)."""

    def __init__(self, bundle: Bundle, threads: Optional[int] = None):
        entry = cam_entry(bundle)
        if not str(entry.get("path", "")).endswith(".tflite"):
            raise BundleError(f"bundle {bundle.root}: its model gives no feature map and it has no "
                              "features.tflite; no heatmaps")
        self._interp = load_tflite_interpreter(verified_file(bundle.root, entry, "CAM feature model"), threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``float32[N, S, S, 1]`` model input -> ``float32[N, h, w, C]``, one image at a time."""
        out = []
        for i in range(len(x)):
            inp = self._interp.get_input_details()[0]
            self._interp.set_tensor(inp["index"], np.asarray(x[i:i + 1], np.float32))
            self._interp.invoke()
            o = self._interp.get_output_details()[0]
            out.append(_dequantize(np.array(self._interp.get_tensor(o["index"])), *o["quantization"]))
        return np.concatenate(out)


def overlay(gray: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The scan in gray with the map as a red-yellow overlay, at the scan's aspect ratio."""
    gray = ImageOps.exif_transpose(gray).convert("L")
    gray.thumbnail((MAX_SIDE, MAX_SIDE))
    heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255), "L").resize(gray.size, Image.Resampling.BICUBIC)
    h = np.asarray(heat, np.float32) / 255.0
    rgb = np.stack([np.clip(2 * h, 0, 1), np.clip(2 * h - 1, 0, 1), np.zeros_like(h)], -1) * 255
    base = np.repeat(np.asarray(gray, np.float32)[..., None], 3, -1)
    a = alpha * h[..., None]
    return Image.fromarray(np.uint8(base * (1 - a) + rgb * a), "RGB")


def heatmap_path(out_dir: Path, source: str) -> Path:
    """``DIR/<stem>-<8 hex digits>.heatmap.png``: the digits are the start of the sha256 of the input's
    resolved absolute path, so files of one name in different folders get different overlays, and a rerun
    on the same file finds (and, without ``--overwrite``, refuses to replace) its earlier overlay."""
    resolved = str(Path(source).resolve())
    digest = hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return Path(out_dir) / f"{Path(source).stem}-{digest}.heatmap.png"
