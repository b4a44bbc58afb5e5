"""SavedModel -> TFLite (float32, float16, full-integer int8), one converter call per subprocess
(TF 2.21's converter leaks memory on every call).

int8 is full-integer: every op is a TFLITE_BUILTINS_INT8 kernel, calibrated on a representative set of
preprocessed images; the interface stays float32 (the model quantizes its input and dequantizes its
probabilities), so the runtime contract is the same for every precision. A model with Flex
(SELECT_TF_OPS) ops is refused: the runtime has no TensorFlow."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

PRECISIONS = ("float32", "float16", "int8")
REPO = Path(__file__).resolve().parent.parent


class ConversionError(RuntimeError):
    pass


def op_names(path: str | Path) -> list[str]:
    """Operator codes a .tflite file uses (builtin names, or the custom code such as ``FlexConv2D``)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    out = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            out.append(code.CustomCode().decode())
        else:
            out.append(names.get(builtin, str(builtin)))
    return out


def check_builtin_only(path: str | Path) -> list[str]:
    ops = op_names(path)
    flex = [o for o in ops if o.startswith("Flex") or o not in _builtin_names()]
    if flex:
        raise ConversionError(f"{path}: has non-builtin ops {flex}; the runtime cannot run them")
    return ops


def _builtin_names() -> set[str]:
    from ai_edge_litert import schema_py_generated as schema

    return {k for k in vars(schema.BuiltinOperator) if not k.startswith("_")} - {"CUSTOM"}


def _convert_here(saved_model: str, out: str, precision: str, calibration: str | None) -> None:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        x = np.load(calibration).astype(np.float32)

        def representative():
            for i in range(len(x)):
                yield [x[i:i + 1]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.float32  # float32 in, probabilities out
        conv.inference_output_type = tf.float32
    Path(out).write_bytes(conv.convert())


def convert(saved_model: str | Path, out: str | Path, precision: str,
            calibration: np.ndarray | str | Path | None = None, timeout: float = 1800) -> Path:
    """Convert in a fresh subprocess; ``calibration`` (int8 only): float32[N, S, S, 1] or a .npy path."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {PRECISIONS}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "export.tflite", str(saved_model), str(out), precision]
    if precision == "int8":
        if calibration is None:
            raise ValueError("int8 needs calibration images")
        if not isinstance(calibration, (str, Path)):
            npy = out.with_suffix(".calibration.npy")
            np.save(npy, np.asarray(calibration, np.float32))
            calibration = npy
        cmd.append(str(calibration))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        if precision == "int8" and str(calibration).endswith(".calibration.npy"):
            Path(calibration).unlink(missing_ok=True)
    if proc.returncode != 0 or not out.is_file():
        raise ConversionError(f"TFLite {precision} conversion failed (exit {proc.returncode}):\n"
                              f"{proc.stderr[-4000:]}")
    check_builtin_only(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.tflite", description="one TFLite conversion")
    ap.add_argument("saved_model")
    ap.add_argument("out")
    ap.add_argument("precision", choices=PRECISIONS)
    ap.add_argument("calibration", nargs="?", help=".npy of float32[N, S, S, 1] model inputs (int8)")
    a = ap.parse_args(argv)
    _convert_here(a.saved_model, a.out, a.precision, a.calibration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
