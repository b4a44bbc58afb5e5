"""What the engine tests (``tests/test_engines*.py``) share: the test scans as a model batch, an engine of a bundle,
and the tolerance between the TFLite and ONNX int8 models."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from _runtime_fixtures import image_files
from cxr_edge import open_engine
from cxr_edge.bundle import load_bundle
from cxr_edge.preprocess import load_gray, to_input

# The TFLite and ONNX int8 models are quantized independently (different converters, calibration statistics
# and rounding), and TFLite also quantizes the softmax output in steps of 1/256 ~ 0.004. So the two differ by a
# few quantization steps per activation; on the tiny bundle that is a max of ~0.008 over these 9 images.
# 0.05 leaves ~6x margin for other toolchain versions yet still catches real faults (wrong input scaling,
# layout or class order move probabilities by 0.3-1.0).
BACKEND_TOL = 0.05


def _batch(bundle: Path) -> np.ndarray:
    spec = load_bundle(bundle).spec
    files = image_files("train") + image_files("test")
    return to_input(np.stack([load_gray(f, spec.size) for f in files]), spec)


def _engine(bundle: Path, backend: str, threads=1):
    b = load_bundle(bundle)
    path, _ = b.model_file(backend)
    return open_engine(path, backend, threads=threads)
