"""Class activation maps (CAM) for models that end in global average pooling + dense.

A bundle with a card entry ``"cam"`` ships a second, small model that outputs the last feature map
(``features.tflite``, ``float32[1, h, w, C]``) and the classifier's dense weights (``cam.npz``: ``weights``
``[C, 3]``, ``bias`` ``[3]``). The map for class k is ``relu(features @ weights[:, k])``, scaled to 0..1:
no gradients needed. Both files are sha256-verified like the model files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cxr_edge.bundle import Bundle, BundleError, verified_file
from cxr_edge.engines import _dequantize, load_tflite_interpreter

MAX_SIDE = 1024  # overlays are written at most this large


class Heatmapper:
    def __init__(self, bundle: Bundle, threads: int | None = None):
        entry = bundle.card.get("cam")
        if not isinstance(entry, dict):
            raise BundleError(f"bundle {bundle.root} has no class-activation model (card entry 'cam')")
        model = verified_file(bundle.root, entry, "CAM feature model")
        weights = verified_file(bundle.root, entry["weights"], "CAM weights")
        with np.load(weights, allow_pickle=False) as z:
            self.weights = z["weights"].astype(np.float32)
        self._interp = load_tflite_interpreter(model, threads)
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]

    def cam(self, x: np.ndarray, k: int) -> np.ndarray:
        """``float32[1, S, S, 1]`` model input -> ``float32[h, w]`` in 0..1 for class index ``k``."""
        self._interp.set_tensor(self._in["index"], np.asarray(x, np.float32))
        self._interp.invoke()
        f = _dequantize(np.array(self._interp.get_tensor(self._out["index"])[0]), *self._out["quantization"])
        m = np.maximum(f @ self.weights[:, k], 0.0)
        return m / m.max() if m.max() > 0 else m


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
    return Path(out_dir) / f"{Path(source).stem}.heatmap.png"
