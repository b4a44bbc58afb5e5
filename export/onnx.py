"""SavedModel -> ONNX float32 (tf2onnx, in a subprocess) -> ONNX int8 (onnxruntime static quantization).

int8: QDQ format, per-channel symmetric int8 weights and int8 activations (S8S8, onnxruntime's documented
first choice) calibrated (MinMax, or a percentile range as a retry) on the same preprocessed images as
TFLite's int8; input and output stay
float32. S8S8 without ``reduce_range`` is the default; the other settings stay available as options and
the export's retry ladder (``export.convert._ladder``) tries some of them; what each attempt measured is
in the export's parity report (``parity.md``, "Int8 attempts"), never typed here."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OPSET = 17


class ConversionError(RuntimeError):
    pass


def from_saved_model(saved_model: str | Path, out: str | Path, opset: int = OPSET,
                     timeout: float = 1800) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model),
           "--signature_def", "serving_default", "--opset", str(opset), "--output", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0 or not out.is_file():
        raise ConversionError(f"tf2onnx failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    import onnx

    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    if "converted from" in model.graph.doc_string:  # tf2onnx names the temporary SavedModel folder: no
        model.graph.doc_string = "converted from a Keras SavedModel by tf2onnx"  # machine paths in a bundle
        onnx.save(model, str(out))
    return out


def op_types(path: str | Path) -> list[str]:
    import onnx

    return sorted({n.op_type for n in onnx.load(str(path)).graph.node})


def _input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path))
    init = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in init)


CALIBRATE = ("minmax", "percentile")
PERCENTILE = 99.999  # "percentile": each activation's range ends where 0.001% of calibration values lie beyond


def _even_batch(n: int, batch: int) -> int:
    """The largest batch size <= ``batch`` that divides ``n``: the histogram calibrators of onnxruntime need
    every calibration batch to have the same shape."""
    return max(d for d in range(1, max(1, min(batch, n)) + 1) if n % d == 0)


def quantize_int8(fp32: str | Path, out: str | Path, calibration: np.ndarray, per_channel: bool = True,
                  reduce_range: bool = False, exclude_op_types: tuple[str, ...] = (),
                  activations: str = "int8", weights: str = "int8",
                  batch: int = 16, calibrate: str = "minmax") -> Path:
    """Static QDQ quantization of ``fp32`` calibrated on ``calibration`` (float32[N, S, S, 1]). ``calibrate``:
    activation ranges from the calibration images' ``minmax`` (the default) or their ``percentile`` range
    (``PERCENTILE``: a few extreme values no longer stretch a range, and so the step, of a whole tensor)."""
    if calibrate not in CALIBRATE:
        raise ValueError(f"calibrate must be one of {CALIBRATE}, got {calibrate!r}")
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, out = Path(fp32), Path(out)
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    x = np.asarray(calibration, np.float32)
    batch = _even_batch(len(x), batch)
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        try:
            quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - onnx / onnxruntime raise many types; the step is optional
            print(f"warning: onnxruntime quant_pre_process failed on {fp32.name} ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); quantizing the float model without it",
                  file=sys.stderr)
            prepped = fp32
        name = _input_name(prepped)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(range(0, len(x), batch))

            def get_next(self):
                i = next(self.it, None)
                return None if i is None else {name: x[i:i + batch]}

        graph = onnx.load(str(prepped)).graph
        exclude = [n.name for n in graph.node if n.op_type in exclude_op_types]
        quantize_static(str(prepped), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=types[activations], weight_type=types[weights],
                        calibrate_method=(CalibrationMethod.Percentile if calibrate == "percentile"
                                          else CalibrationMethod.MinMax),
                        nodes_to_exclude=exclude,
                        extra_options={"CalibTensorRangeSymmetric": False,
                                       **({"CalibPercentile": PERCENTILE} if calibrate == "percentile" else {})})
    return out
