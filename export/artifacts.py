"""The export's model files: the formats (``FORMATS``: backend and precision; one model file per backend in a bundle,
``BUNDLE_GROUPS``), one file built from the SavedModel (``build_artifact``: ``export.tflite``, ``export.onnx``) and the
int8 retry ladder, decided on the validation split only (``int8_with_retries``). ``export.convert`` measures and
bundles them."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export import onnx as onnx_x
from export import parity, tflite

# format name -> (backend, precision)
FORMATS = {"tflite-float32": ("tflite", "float32"), "tflite-float16": ("tflite", "float16"),
           "tflite-int8": ("tflite", "int8"), "onnx-float32": ("onnx", "float32"),
           "onnx-int8": ("onnx", "int8")}
FILE_NAMES = {"tflite": "model.tflite", "onnx": "model.onnx"}
BUNDLE_GROUPS = {"float32": ("tflite-float32", "onnx-float32"), "float16": ("tflite-float16",),
                 "int8": ("tflite-int8", "onnx-int8")}


def _check_formats(formats) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    backends = [FORMATS[f][0] for f in formats]
    if len(set(backends)) != len(backends):
        raise ValueError(f"a bundle holds one model per backend, got {list(formats)}")


def build_artifact(saved_model: Path, fmt: str, dest: Path, calibration: np.ndarray | None,
                   work: Path, **options) -> Path:
    """One model file from the SavedModel. ``options`` (int8 ONNX): those of
    ``export.onnx.quantize_int8`` (per_channel, reduce_range, exclude_op_types, activations, calibrate)."""
    backend, precision = FORMATS[fmt]
    if backend == "tflite":
        return tflite.convert(saved_model, dest, precision, calibration if precision == "int8" else None)
    fp32 = work / f"{Path(saved_model).name}.float32.onnx"  # one per SavedModel (float, or prepared for int8)
    if not fp32.is_file():
        onnx_x.from_saved_model(saved_model, fp32)
    if precision == "float32":
        shutil.copyfile(fp32, dest)
        return dest
    return onnx_x.quantize_int8(fp32, dest, calibration, **options)


@dataclass
class Target:
    """One bundle folder to write: its formats (one per backend) and card name."""
    group: str
    dir: Path
    formats: tuple
    name: str


def _ladder(fmt: str, n: int) -> list[dict]:
    """Int8 attempts, in order, until one passes the gate: more and fewer calibration images (activation
    ranges from a different sample); for ONNX, first percentile ranges (``export.onnx.PERCENTILE``) on the
    same images, and last the classifier head kept in float."""
    sizes = [{"calibration": n}, {"calibration": max(50, n // 3)}, {"calibration": 3 * n}]
    if fmt == "tflite-int8":
        return sizes
    head = ("Softmax", "MatMul", "Gemm")
    return sizes[:1] + [{"calibration": n, "calibrate": "percentile"}] + sizes[1:] + [
            {"calibration": 3 * n, "exclude_op_types": head},
            {"calibration": 3 * n, "exclude_op_types": head, "activations": "uint8"}]


def int8_with_retries(fmt: str, ladder: list[dict], attempt: Callable[[dict], tuple[dict, dict]],
                      ref_val_accuracy: float) -> dict:
    """Run ``attempt(options) -> (measurement, options used)`` along ``ladder`` until the measurement's
    *validation* accuracy is within the gate of the float model's; the last measurement, with every
    attempt recorded. Nothing but ``measurement["validation"]`` is read."""
    tried = []
    for opts in ladder:
        res, used = attempt(dict(opts))
        drop = parity.drop_pp(ref_val_accuracy, res["validation"]["accuracy"])
        tried.append({**used, "validation_accuracy": res["validation"]["accuracy"], "drop_pp": round(drop, 3)})
        if drop <= parity.MAX_INT8_DROP_PP + 1e-9:
            break
        print(f"  {fmt}: {drop:.2f} pp below float on validation, retrying", flush=True)
    res["attempts"], res["options"] = tried, used
    return res
