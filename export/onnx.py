"""SavedModel -> ONNX float32 (tf2onnx, in a subprocess) -> ONNX int8 (onnxruntime static quantization).

int8: QDQ format, per-channel symmetric int8 weights and **uint8** activations (U8S8) calibrated (MinMax,
or a percentile range as a retry) on the same preprocessed images as TFLite's int8; input and output stay
float32. Why U8S8 and not onnxruntime's documented default S8S8 (docs/runtimes.md): on x86 the CPU
provider has no int8-activation kernels for the residual Add, Concat and pooling, so with S8S8 it left 17
of the shipped model's 49 convolutions, all 9 Adds and the pooling as float ops between Dequantize/Quantize
pairs with 31 layout Transposes, and ran the int8 graph no faster than float (4.4 ms against 4.4 ms, 1.95 ms
for LiteRT); with uint8 activations every convolution becomes a QLinearConv and every Add a QLinearAdd
(2.0 ms). ``activations_to_uint8`` turns an S8S8 graph into the same U8S8 graph exactly (each activation's
zero point + 128: the same real values), which is how the shipped model.onnx was converted. The other
settings stay available as options and the export's retry ladder (``export.convert._ladder``) tries some of
them; what each attempt measured is in the export's parity report (``parity.md``, "Int8 attempts")."""
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
                  activations: str = "uint8", weights: str = "int8",
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


def activations_to_uint8(src: str | Path, out: str | Path) -> Path:
    """The QDQ graph ``src`` with its int8 activations stored as uint8: every QuantizeLinear /
    DequantizeLinear of an activation (not of a weight initializer) gets its zero point + 128, so each
    quantized value moves by 128 and stands for the same real number; weights stay int8. Exact in the
    quantized domain (the kernels onnxruntime picks then round differently from its float emulation of the
    S8S8 graph's unfused ops: shipped model, validation labels all equal)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    init = {t.name: t for t in model.graph.initializer}
    shifted = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in init:
            continue  # a weight: stays int8
        zp = node.input[2]
        if zp in shifted or zp not in init:
            continue
        z = numpy_helper.to_array(init[zp])
        if z.dtype == np.int8:
            init[zp].CopyFrom(numpy_helper.from_array((z.astype(np.int16) + 128).astype(np.uint8), zp))
            shifted.add(zp)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return Path(out)



def float_from_qdq(src: str | Path, out: str | Path) -> Path:
    """A float32 graph from a QDQ graph: weight DequantizeLinear nodes folded into float initializers, each
    activation's QuantizeLinear -> DequantizeLinear pair dropped, and the ReLU6 the quantizer folded into a
    Q range (the tensors tf2onnx names ``...Relu6:0`` / ``...Relu:0``) put back as Clip. With the int8 weights as
    float: the ONNX float32 row of ``python -m benchmarks.onnx_speed`` where the run's float bundle is not
    here (runs/ stays out of git), and a float graph to re-quantize."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    init = {t.name: t for t in g.initializer}
    arr = {n: numpy_helper.to_array(t) for n, t in init.items()}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rename, nodes, folded = {}, [], []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in init:
            q, scale = arr[n.input[0]].astype(np.float64), arr[n.input[1]].astype(np.float64)
            zero = arr[n.input[2]].astype(np.float64) if len(n.input) > 2 else np.zeros_like(scale)
            if scale.ndim == 1 and q.ndim > 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            folded.append(numpy_helper.from_array(((q - zero) * scale).astype(np.float32), n.output[0]))
        elif n.op_type == "QuantizeLinear":
            for c in consumers.get(n.output[0], []):
                rename[c.output[0]] = n.input[0]
        elif not (n.op_type == "DequantizeLinear" and n.output[0] in rename):
            nodes.append(n)
    outputs = {o.name for o in g.output}
    keep_name = {rename[o]: o for o in outputs if o in rename}  # a graph output keeps its name

    def name(x: str) -> str:
        while x in rename and x not in outputs:
            x = rename[x]
        return keep_name.get(x, x)

    final = []
    for n in nodes:
        n.input[:] = [name(x) for x in n.input]
        n.output[:] = [name(x) for x in n.output]
        final.append(n)
        for k, o in enumerate(n.output):
            if o.endswith(("Relu6:0", "Relu:0")) and n.op_type not in ("Relu", "Clip"):
                n.output[k] = o + "_unclipped"
                bounds = ["relu6_low", "relu6_high"] if o.endswith("Relu6:0") else ["relu6_low"]
                final.append(helper.make_node("Clip", [n.output[k], *bounds], [o]))
    used = {x for n in final for x in n.input}
    inits = [t for t in list(g.initializer) + folded if t.name in used]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("relu6_low", 0), ("relu6_high", 6))]
    del g.node[:]
    g.node.extend(final)
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return Path(out)

if __name__ == "__main__":  # python -m export.onnx uint8 IN.onnx OUT.onnx
    if len(sys.argv) != 4 or sys.argv[1] != "uint8":
        raise SystemExit("usage: python -m export.onnx uint8 IN.onnx OUT.onnx")
    print(activations_to_uint8(sys.argv[2], sys.argv[3]))
